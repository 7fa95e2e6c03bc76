"""Design2Code: rendering sandbox (headless Chromium, network blocked), block matching and metrics.

Needs Chromium (``apt-get install -y chromium``) and ``pip install playwright``; when the browser
cannot be started these tests FAIL (they do not skip): CI installs both.
"""

from __future__ import annotations

import time

import pytest
from PIL import Image

from viscodex_jax.eval.base import Item
from viscodex_jax.eval.design2code import official
from viscodex_jax.eval.design2code.benchmark import METRICS, PROMPT, Design2Code, clip_image, extract_html
from viscodex_jax.eval.design2code.render import BrowserUnavailable, Renderer, RenderTimeout, get_renderer

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
    B = official.Block
    a = B("alpha beta gamma", (0.0, 0.0, 0.5, 0.2), (0, 0, 0))  # area 0.1
    b = B("delta epsilon zeta", (0.0, 0.5, 0.5, 0.4), (0, 0, 0))  # area 0.2
    s, _ = official.official_scores([a], [a, b])
    assert s["block_match"] == pytest.approx(0.2 / 0.4)
    assert s["text"] == s["position"] == s["color"] == 1.0
    # Chebyshev distance of centres: moved 0.3 right and 0.1 down -> 0.7
    moved = B(a.text, (0.3, 0.1, 0.5, 0.2), (0, 0, 0))
    assert official.official_scores([moved], [a])[0]["position"] == pytest.approx(0.7)
    # a paragraph split in two on the reference is merged to match the prediction's single block
    whole = B("alpha beta gamma delta epsilon zeta", (0.0, 0.0, 0.5, 0.9), (0, 0, 0))
    pred, ref, pairs = official.merge_and_match([whole], [a, b])
    assert len(ref) == 1 and ref[0].text == whole.text and pairs == [(0, 0)]
    # below 0.5 text similarity nothing is matched
    far = B("completely unrelated words", a.bbox, (0, 0, 0))
    assert official.official_scores([far], [a])[0]["low_level"] == 0.0
    # blocks with the same box are one block (texts joined, colours averaged)
    merged = official.merge_by_bbox([B("x", a.bbox, (0, 0, 0)), B("y", a.bbox, (10, 20, 30))])
    assert len(merged) == 1 and merged[0].text == "x y" and merged[0].color == (5, 10, 15)


def test_official_blocks_from_renders():
    """Text pixels are where the two re-styled screenshots differ by 50; each text node's block is the
    box of its colour's pixels, its colour the mean of the plain screenshot there."""
    import numpy as np

    H, W = 20, 40
    shot = np.full((H, W, 3), 255, np.uint8)
    p0 = np.full((H, W, 3), 255, np.uint8)
    p0[2:6, 4:10] = (250, 250, 250)  # the first pool colour, #FAFAFA
    p1 = p0.copy()
    p1[2:6, 4:10] = (44, 44, 44)  # (250 + 50) % 256
    shot[2:6, 4:10] = (200, 0, 0)
    blocks = official.blocks_from_renders(shot, p0, p1, [("Hello World", "#FAFAFA"), ("gone", "#0A0A0A")])
    assert len(blocks) == 1 and blocks[0].text == "hello world" and blocks[0].color == (200, 0, 0)
    assert blocks[0].bbox == pytest.approx((4 / W, 2 / H, 6 / W, 4 / H))
    p0_html, p1_html = official.restyle("<html><body><p>Hi <em>there</em></p><div>x</div></body></html>", (0, 50))
    assert official.text_items(p0_html) == [("Hi", "#FAFAFA"), ("there", "#FAFAFA"), ("x", "#FAFAEA")]
    assert "#2C2C2C" in p1_html and "#FAFAFA" not in p1_html


def test_extract_html():
    # the official cleanup: fences at the very start/end, text before <!DOCTYPE and after </html> go
    assert official.cleanup_response("```html\n<!DOCTYPE html><html><body>x</body></html>\n```") == \
        "<!DOCTYPE html><html><body>x</body></html>"
    raw = "Sure! <!DOCTYPE html><html><body>x</body></html> Hope this helps."
    assert official.cleanup_response(raw) == "<!DOCTYPE html><html><body>x</body></html>"
    # then BeautifulSoup (html.parser) re-serialises the page, as the official pre-processing does
    assert extract_html(raw) == "<!DOCTYPE html>\n<html><body>x</body></html>"
    # no <html> tag: wrapped as text into a paragraph (official make_html)
    assert extract_html("<p>plain</p>") == "<html><body><p><p>plain</p></p></body></html>"


def test_failed_render_scores_as_blank_page(item):
    bench = Design2Code()
    bench._reference(item, None)  # the reference with the usual time limit (a loaded machine is slow)
    bench.renderer = Renderer(timeout_s=3)
    try:
        s = bench.score(item, "<html><body><p>Welcome to the garden shop</p><script>while(true){}</script></body></html>")
    finally:
        bench.renderer.close()
    assert s["render_error"] == 1.0
    for k in METRICS + ("low_level", "score"):
        assert s[k] == 0.0, (k, s)


def test_load_parquet(tmp_path, caplog):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), "white").save(buf, format="PNG")
    png = buf.getvalue()
    rows = [{"image": {"bytes": png, "path": "7.png"}, "text": "<html><body><p>a</p></body></html>"},
            {"image": {"bytes": b"not a png", "path": "8.png"}, "text": "<p>b</p>"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=r"train-00000-of-00001.parquet: row 1"):
        Design2Code().load(str(tmp_path))
    b = Design2Code(on_error="skip")
    items = b.load(str(tmp_path))
    assert [it.id for it in items] == ["7", "8"]
    assert items[0].images[0].size == (64, 48) and items[0].reference.startswith("<html>")
    assert "row 1" in items[1].reference.reason and len(b.skipped) == 1
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(ValueError, match="bad.parquet: not a readable parquet file"):
        Design2Code().load(str(tmp_path / "bad.parquet"))


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
        # the official direct prompt, text before the screenshot as prompting/gpt4v.py sends it
        assert it.messages[0]["role"] == "user" and content == [{"type": "text", "text": PROMPT}, {"type": "image"}]
        assert "rick.jpg" in PROMPT and "HTML+CSS" in PROMPT
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
    # an empty answer is a page without blocks: CLIP of its (blank) screenshot against the masked reference
    ref_blocks, ref_shot = b._reference(it, None)
    empty_shot = renderer.render("<html><body><p></p></body></html>", blocks=False).image()
    import numpy as np

    want = b._clip_model().similarity(clip_image(np.asarray(empty_shot), []),
                                      clip_image(ref_shot, official.merge_by_bbox(ref_blocks)))
    assert b.score(it, "")["clip"] == pytest.approx(want, abs=1e-5)
    assert clip_image(ref_shot, []).size == (min(ref_shot.shape[:2]),) * 2
    with pytest.raises(FileNotFoundError):
        Design2Code(clip_path=str(tmp_path / "absent")).score(it, PAGE)
