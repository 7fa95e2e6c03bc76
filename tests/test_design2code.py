"""Design2Code: rendering sandbox (headless Chromium, network blocked), block matching and metrics.

Needs Chromium (``apt-get install -y chromium``) and ``pip install playwright``; when the browser
cannot be started these tests FAIL (they do not skip): CI installs both.
"""

from __future__ import annotations

import time

import pytest
from PIL import Image

from viscodex_jax.eval.base import Item
from viscodex_jax.eval.design2code import (
    METRICS, Design2Code, extract_html, low_level_scores, merge_and_match, text_similarity,
)
from viscodex_jax.eval.render import BrowserUnavailable, Renderer, RenderTimeout, TextBlock, get_renderer

PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><style>
body{margin:0;padding:20px;font-family:sans-serif}
h1{color:#1f4e79;font-size:30px} p{color:#333;font-size:16px} .btn{background:#e67e22;color:#fff;padding:10px 20px;border:0}
.box{width:300px;height:80px;background:#27ae60;color:#fff;padding:10px}
</style></head><body>
<h1>Welcome to the garden shop</h1>
<p id="intro">We sell seeds, tools and plants for every season.</p>
<button class="btn">Browse the catalogue</button>
<div class="box">Free delivery on orders over fifty euros</div>
<p id="foot">Contact us at the front desk.</p>
</body></html>"""


@pytest.fixture(scope="module")
def renderer():
    try:
        return get_renderer()
    except BrowserUnavailable as e:  # CI installs Chromium: a missing browser is a failure, not a skip
        pytest.fail(f"headless Chromium is needed for Design2Code and could not be started: {e}", pytrace=False)


@pytest.fixture(scope="module")
def bench(renderer):
    return Design2Code()


@pytest.fixture(scope="module")
def item():
    return Item("page", [], [], PAGE)


def _check_metrics(s):
    for k in METRICS + ("low_level",):
        assert 0.0 <= s[k] <= 1.0 + 1e-9, (k, s)
    assert s["score"] == pytest.approx(100 * s["low_level"])
    assert s["low_level"] == pytest.approx(sum(s[k] for k in METRICS) / 4)


# -- rendering ----------------------------------------------------------------------------------------

def test_render_blocks_and_screenshot(renderer):
    res = renderer.render(PAGE)
    texts = [b.text for b in res.blocks]
    assert texts == ["Welcome to the garden shop", "We sell seeds, tools and plants for every season.",
                     "Browse the catalogue", "Free delivery on orders over fifty euros", "Contact us at the front desk."]
    h1 = res.blocks[0]
    assert h1.color == (0x1F, 0x4E, 0x79) and h1.tag == "h1"
    assert res.blocks[2].color == (255, 255, 255)
    for b in res.blocks:
        x, y, w, h = b.bbox
        assert 0 <= x < 1 and 0 <= y < 1 and 0 < w <= 1 and 0 < h <= 1
    ys = [b.bbox[1] for b in res.blocks]
    assert ys == sorted(ys)
    img = res.image()
    assert img.size[0] == 1280 and img.size[1] >= 720 and res.page_size[0] == 1280
    # inline children join their block; hidden text and scripts are not blocks
    res = renderer.render("<div>Hello <b style='color:red'>big</b> world<script>var x='no'</script>"
                          "<span style='display:none'>hidden</span><p>nested</p></div>", screenshot=False)
    assert [b.text for b in res.blocks] == ["Hello big world", "nested"]
    assert res.png is None


def test_external_requests_are_blocked(renderer):
    html = """<html><body><p>still renders</p><p id="s">pending</p>
    <img src="http://example.com/x.png"><link rel="stylesheet" href="https://example.com/s.css">
    <iframe src="http://example.org/frame"></iframe>
    <script>
      fetch('http://example.com/api?q=1')
        .then(() => { document.getElementById('s').textContent = 'LEAKED'; })
        .catch(() => { document.getElementById('s').textContent = 'fetch failed'; });
    </script></body></html>"""
    res = renderer.render(html)
    assert "http://example.com/x.png" in res.blocked  # aborted by our route handler
    assert "http://example.com/api?q=1" in res.blocked
    assert "https://example.com/s.css" in res.blocked
    assert any(u.startswith("http://example.org/frame") for u in res.blocked)
    texts = [b.text for b in res.blocks]
    assert "still renders" in texts and "LEAKED" not in texts
    assert res.png and res.png[:8] == b"\x89PNG\r\n\x1a\n"


def test_assets_dir_serves_only_its_images(renderer, tmp_path):
    Image.new("RGB", (40, 30), "#3366cc").save(tmp_path / "rick.jpg")
    (tmp_path / "secret.html").write_text("<p>other page</p>")
    html = ("<p>img</p><img id='i' src='rick.jpg'><img src='../rick.jpg'><img src='/etc/hostname.png'>"
            "<iframe src='secret.html'></iframe>")
    res = renderer.render(html, assets_dir=str(tmp_path))
    assert "http://page.invalid/rick.jpg" not in res.blocked
    assert "http://page.invalid/secret.html" in res.blocked and "http://page.invalid/etc/hostname.png" in res.blocked
    img = res.image()
    assert img.getpixel((20, 60))[2] > 150  # the blue placeholder is drawn
    no_assets = renderer.render(html)
    assert "http://page.invalid/rick.jpg" in no_assets.blocked


def test_page_navigating_away_stays(renderer):
    res = renderer.render("<p>stay here</p><script>location.href = 'http://example.com/'</script>")
    assert [b.text for b in res.blocks] == ["stay here"]
    assert any("example.com" in u for u in res.blocked)


def test_hung_page_times_out_and_browser_survives():
    with Renderer(timeout_s=2) as r:
        t0 = time.time()
        with pytest.raises(RenderTimeout):
            r.render("<p>x</p><script>setTimeout(() => { while (true) {} }, 0)</script>")
        assert time.time() - t0 < 15
        assert [b.text for b in r.render("<p>after</p>", screenshot=False).blocks] == ["after"]


def test_missing_browser_is_a_clear_error(tmp_path):
    with pytest.raises(BrowserUnavailable, match="apt-get install -y chromium"):
        Renderer(executable_path=str(tmp_path / "no-chromium")).start()


# -- metrics ------------------------------------------------------------------------------------------

def test_identical_page_is_perfect(bench, item):
    s = bench.score(item, "Here is the page:\n```html\n" + PAGE + "\n```\nDone.")
    _check_metrics(s)
    for k in METRICS + ("low_level",):
        assert s[k] == pytest.approx(1.0), (k, s)
    assert s["score"] == pytest.approx(100.0) and s["render_error"] == 0.0


def test_changed_text_color_lowers_color_only(bench, item):
    s = bench.score(item, PAGE.replace("h1{color:#1f4e79", "h1{color:#ff2020").replace("p{color:#333", "p{color:#00cc00"))
    _check_metrics(s)
    assert s["color"] < 0.8
    for k in ("block_match", "text", "position"):
        assert s[k] == pytest.approx(1.0, abs=1e-6), (k, s)


def test_moved_blocks_lower_position(bench, item):
    s = bench.score(item, PAGE.replace("padding:20px;", "padding:20px 20px 20px 500px;"))
    _check_metrics(s)
    assert s["position"] < 0.8
    assert s["text"] == pytest.approx(1.0) and s["color"] == pytest.approx(1.0)


def test_missing_blocks_lower_block_match(bench, item):
    html = PAGE.replace('<div class="box">Free delivery on orders over fifty euros</div>', "").replace(
        '<p id="foot">Contact us at the front desk.</p>', "")
    s = bench.score(item, html)
    _check_metrics(s)
    assert s["block_match"] < 0.9
    assert s["text"] == pytest.approx(1.0) and s["color"] == pytest.approx(1.0)


@pytest.mark.parametrize("generation", ["", "   ", "```html\n```", "Sorry, I cannot do that.", "<div><<<>>> <p",
                                        "```html\n<html><body><script>throw new Error('x')</script></body></html>\n```",
                                        "<p>" + "\x00\ud800 broken" * 3])
def test_invalid_or_empty_html_scores_zero(bench, item, generation):
    s = bench.score(item, generation)
    for k in METRICS + ("low_level", "score"):
        assert s[k] == 0.0, (k, s)


def test_block_match_formula_and_merging():
    a = TextBlock("alpha beta gamma", (0.0, 0.0, 0.5, 0.2), (0, 0, 0))  # area 0.1
    b = TextBlock("delta epsilon zeta", (0.0, 0.5, 0.5, 0.4), (0, 0, 0))  # area 0.2
    s = low_level_scores([a, b], [a])
    assert s["block_match"] == pytest.approx(0.2 / 0.4)
    assert s["text"] == s["position"] == s["color"] == 1.0
    # Chebyshev distance of centres: moved 0.3 right and 0.1 down -> 0.7
    moved = TextBlock(a.text, (0.3, 0.1, 0.5, 0.2), (0, 0, 0))
    assert low_level_scores([a], [moved])["position"] == pytest.approx(0.7)
    # a paragraph split in two on one page is merged to match the other page's single block
    whole = TextBlock("alpha beta gamma delta epsilon zeta", (0.0, 0.0, 0.5, 0.9), (0, 0, 0))
    ref, cand, matched = merge_and_match([a, b], [whole])
    assert len(ref) == 1 and matched == [(0, 0, 1.0)]
    # below 0.5 text similarity nothing is matched
    assert text_similarity("abc", "xyz") == 0.0
    assert low_level_scores([a], [TextBlock("completely unrelated words", a.bbox, (0, 0, 0))])["low_level"] == 0.0


def test_extract_html():
    assert extract_html("blah\n```html\n<p>x</p>\n```\nbye") == "<p>x</p>\n"
    raw = "Sure! <!DOCTYPE html><html><body>x</body></html> Hope this helps."
    assert extract_html(raw) == "<!DOCTYPE html><html><body>x</body></html>"
    assert extract_html("<p>plain</p>") == "<p>plain</p>"


# -- layout -------------------------------------------------------------------------------------------

def test_load_make_sample(renderer, tmp_path):
    root = Design2Code.make_sample(str(tmp_path / "testset_final"))
    b = Design2Code()
    items = b.load(root)
    assert 3 <= len(items) <= 4
    assert [it.id for it in items] == sorted((it.id for it in items), key=int)
    for it in items:
        assert len(it.images) == 1 and isinstance(it.images[0], Image.Image) and it.images[0].size[0] == 1280
        content = it.messages[0]["content"]
        assert it.messages[0]["role"] == "user" and content[0] == {"type": "image"}
        assert "HTML" in content[1]["text"] and "screenshot" in content[1]["text"]
        assert it.reference == (tmp_path / "testset_final" / f"{it.id}.html").read_text()
    assert len(b.load(str(tmp_path), limit=2)) == 2  # the parent of testset_final/ works too
    s = b.score(items[0], f"```html\n{items[0].reference}```")
    assert s["score"] == pytest.approx(100.0)
    agg = b.aggregate([s, b.score(items[1], "")])
    assert agg["score"] == pytest.approx(50.0)
    with pytest.raises(FileNotFoundError):
        b.load(str(tmp_path / "nothing-here"))


def test_clip_from_local_checkpoint(renderer, tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)
    path = tmp_path / "clip"
    CLIPModel(cfg).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    b = Design2Code(clip_path=str(path))
    it = Item("p", [], [renderer.render(PAGE).image()], PAGE)
    s = b.score(it, PAGE)
    assert s["clip"] == pytest.approx(1.0, abs=1e-4) and s["score"] == pytest.approx(100.0)
    assert b.score(it, "")["clip"] == 0.0
    with pytest.raises(FileNotFoundError):
        Design2Code(clip_path=str(tmp_path / "absent")).score(it, PAGE)
