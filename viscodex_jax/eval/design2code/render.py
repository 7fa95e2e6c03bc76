"""Renders HTML strings in headless Chromium: a PNG screenshot and the page's visible text blocks.

This is the sandbox for model-written HTML (``eval.sandbox`` is for Python). Each page runs
with JavaScript enabled, in a fresh browser context (no cookies or storage shared between
pages), with the network cut in layers:

* every request of the page is intercepted (``context.route``): only the page itself (served
  from the fake origin ``http://page.invalid/``) and, when an ``assets_dir`` is given, image,
  font and stylesheet files directly inside that directory are answered; everything else is
  aborted and its URL recorded in ``RenderResult.blocked`` (``data:``/``blob:`` URLs never
  reach the network and are allowed; a main-frame navigation elsewhere is answered with an
  empty "204 No Content" instead, so the page stays shown);
* WebSockets are closed before they connect (``context.route_web_socket``) and recorded too;
  service workers are blocked; pop-up windows are closed;
* underneath, the browser is started with a proxy that leads nowhere (``127.0.0.1:9``, for
  loopback addresses too), every host name resolving to nothing, and WebRTC kept off
  non-proxied UDP, so a request that slipped past the interception still could not leave.

Each page has a time limit (``timeout_s``) for everything (loading, scripts, measuring,
screenshot). A page that never finishes loading or whose script never yields
(``while(true){}``) raises ``RenderTimeout``; its context is torn down by the browser process
and the browser stays usable (it is restarted if it died).

Playwright's async API runs on one private event-loop thread per ``Renderer``, so a hung page
can always be cut off, and ``render`` may be called from any thread. ``get_renderer()`` is the
per-process renderer, started lazily; ``shutdown()`` (also registered with ``atexit``) closes
it. A ``Renderer`` is also a context manager of its own. After ``fork`` a child process starts
its own browser.

Set-up: ``apt-get install -y chromium`` (``/usr/bin/chromium``; set ``$VISCODEX_CHROMIUM`` for
another binary) and ``pip install playwright`` (no ``playwright install``: the Debian browser
is used).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import dataclasses
import io
import os
import re
import threading
import time
from typing import Any, Sequence

__all__ = [
    "TextBlock", "RenderResult", "RenderError", "RenderTimeout", "BrowserUnavailable", "Renderer",
    "get_renderer", "shutdown", "render_html", "screenshot_png", "text_blocks", "CHROMIUM_ARGS",
]

DEFAULT_CHROMIUM = "/usr/bin/chromium"
PAGE_ORIGIN = "http://page.invalid"  # ".invalid" never resolves; requests to it are answered by us
PAGE_URL = PAGE_ORIGIN + "/"
CHROMIUM_ARGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
    # a second layer under the request interception: nothing can reach a real host
    "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
    "--host-resolver-rules=MAP * ~NOTFOUND", "--force-webrtc-ip-handling-policy=disable_non_proxied_udp",
    "--js-flags=--max-old-space-size=1024",  # a page that eats memory crashes alone, early
    "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", "--disable-extensions",
    "--disable-default-apps", "--no-default-browser-check", "--disable-breakpad",
    "--disable-features=Translate,OptimizationHints,MediaRouter,DialMediaRouteProvider,AutofillServerCommunication",
)
# files an ``assets_dir`` may serve (no .html: a page must not frame another page of the data set)
ASSET_TYPES = {
    ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
    ".webp": "image/webp", ".svg": "image/svg+xml", ".ico": "image/x-icon", ".bmp": "image/bmp",
    ".css": "text/css", ".woff": "font/woff", ".woff2": "font/woff2", ".ttf": "font/ttf", ".otf": "font/otf",
}


class RenderError(RuntimeError):
    """The page could not be rendered (crash, navigation error...)."""


class RenderTimeout(RenderError):
    """The page did not load/render within the time limit."""


class BrowserUnavailable(RenderError):
    """Chromium or Playwright is missing or cannot be started."""


@dataclasses.dataclass(frozen=True)
class TextBlock:
    """The own text of one block-level element (its inline descendants' text included, nested blocks not).

    ``bbox`` is ``(x, y, w, h)`` of the union of the text's line boxes divided by the page's
    full width and height (so in [0, 1]); ``color`` is the computed CSS ``color`` as sRGB
    0..255 (the one covering most characters when inline children differ), composited over
    white when translucent.
    """

    text: str
    bbox: tuple[float, float, float, float]
    color: tuple[int, int, int]
    tag: str = ""

    @property
    def area(self) -> float:
        return self.bbox[2] * self.bbox[3]

    @property
    def center(self) -> tuple[float, float]:
        return self.bbox[0] + self.bbox[2] / 2, self.bbox[1] + self.bbox[3] / 2


@dataclasses.dataclass
class RenderResult:
    png: bytes | None  # full-page screenshot (None when not asked for)
    blocks: list[TextBlock]
    page_size: tuple[int, int]  # full page (width, height) in CSS pixels
    blocked: list[str]  # URLs the page asked for that were aborted
    seconds: float = 0.0

    def image(self):
        """The screenshot as an RGB PIL image."""
        from PIL import Image

        if self.png is None:
            raise ValueError("rendered without a screenshot")
        return Image.open(io.BytesIO(self.png)).convert("RGB")


# Groups the page's visible text nodes by their nearest non-inline ancestor. Returns the page
# size and, per group in document order: text, bbox in page pixels, color (CSS string), tag.
_BLOCKS_JS = r"""
() => {
  const doc = document.documentElement;
  const body = document.body || doc;
  const W = Math.max(doc.scrollWidth, body.scrollWidth, window.innerWidth);
  const H = Math.max(doc.scrollHeight, body.scrollHeight, window.innerHeight);
  const sx = window.scrollX, sy = window.scrollY;
  const SKIP = 'script,style,noscript,template,head,title,textarea,select,option,iframe,object';
  const inlineCache = new Map();
  const isInline = (el) => {
    let v = inlineCache.get(el);
    if (v === undefined) {
      const d = getComputedStyle(el).display;
      v = d === 'inline' || d === 'contents' || d.startsWith('ruby');
      inlineCache.set(el, v);
    }
    return v;
  };
  const blockOf = (el) => {
    while (el && el !== body && el !== doc && isInline(el)) el = el.parentElement;
    return el || body;
  };
  const groups = new Map();
  const order = [];
  const walker = document.createTreeWalker(body, NodeFilter.SHOW_TEXT | NodeFilter.SHOW_ELEMENT);
  const range = document.createRange();
  let n;
  while ((n = walker.nextNode())) {
    if (n.nodeType === Node.ELEMENT_NODE) {
      if (n.tagName === 'BR') { const g = groups.get(blockOf(n.parentElement)); if (g) g.parts.push(' '); }
      continue;
    }
    const raw = n.nodeValue;
    if (!raw || !raw.trim()) continue;
    const parent = n.parentElement;
    if (!parent || parent.closest(SKIP)) continue;
    if (parent.checkVisibility && !parent.checkVisibility({opacityProperty: true, visibilityProperty: true}))
      continue;
    const st = getComputedStyle(parent);
    if (st.visibility !== 'visible') continue;
    range.selectNodeContents(n);
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const r of range.getClientRects()) {
      if (r.width <= 0 || r.height <= 0) continue;
      const a = Math.max(0, r.left + sx), b = Math.max(0, r.top + sy);
      const c = Math.min(W, r.right + sx), d = Math.min(H, r.bottom + sy);
      if (c <= a || d <= b) continue;
      x0 = Math.min(x0, a); y0 = Math.min(y0, b); x1 = Math.max(x1, c); y1 = Math.max(y1, d);
    }
    if (!(x1 > x0 && y1 > y0)) continue;
    const blk = blockOf(parent);
    let g = groups.get(blk);
    if (!g) {
      g = {parts: [], x0, y0, x1, y1, colors: new Map(), tag: blk.tagName.toLowerCase()};
      groups.set(blk, g);
      order.push(g);
    }
    g.parts.push(raw);
    g.x0 = Math.min(g.x0, x0); g.y0 = Math.min(g.y0, y0); g.x1 = Math.max(g.x1, x1); g.y1 = Math.max(g.y1, y1);
    const len = raw.trim().length;
    g.colors.set(st.color, (g.colors.get(st.color) || 0) + len);
  }
  const out = [];
  for (const g of order) {
    const text = g.parts.join('').replace(/\s+/g, ' ').trim();
    if (!text) continue;
    let color = null, best = -1;
    for (const [c, k] of g.colors) if (k > best) { best = k; color = c; }
    out.push({text, x: g.x0, y: g.y0, w: g.x1 - g.x0, h: g.y1 - g.y0, color, tag: g.tag});
  }
  return {width: W, height: H, blocks: out};
}
"""

# CSS color strings of any syntax Chrome may return (rgba() with alpha, color(srgb ...),
# oklch()...) -> [r, g, b] 0..255 over white, by painting them on a 1x1 canvas.
_COLORS_JS = r"""
(colors) => {
  const c = document.createElement('canvas');
  c.width = c.height = 1;
  const ctx = c.getContext('2d', {willReadFrequently: true});
  return colors.map((s) => {
    ctx.globalCompositeOperation = 'copy';
    ctx.fillStyle = '#ffffff'; ctx.fillRect(0, 0, 1, 1);
    ctx.globalCompositeOperation = 'source-over';
    ctx.fillStyle = '#000000'; ctx.fillStyle = s; ctx.fillRect(0, 0, 1, 1);
    const d = ctx.getImageData(0, 0, 1, 1).data;
    return [d[0], d[1], d[2]];
  });
}
"""

_SIZE_JS = r"""
() => {
  const doc = document.documentElement;
  const body = document.body || doc;
  return {width: Math.max(doc.scrollWidth, body.scrollWidth, window.innerWidth),
          height: Math.max(doc.scrollHeight, body.scrollHeight, window.innerHeight), blocks: []};
}
"""

_LOADED_JS = """() => new Promise((resolve) => {
  if (document.readyState === 'complete') resolve(1);
  else window.addEventListener('load', () => resolve(1), {once: true});
})"""

_RGB_RE = re.compile(r"^rgba?\(\s*([\d.]+)[,\s]+([\d.]+)[,\s]+([\d.]+)\s*(?:[,/]\s*([\d.]+%?)\s*)?\)$")


def _parse_css_rgb(s: str) -> tuple[int, int, int] | None:
    """``rgb(r, g, b)`` / opaque ``rgba(...)`` -> ints; anything else -> None (painted in the page)."""
    m = _RGB_RE.match((s or "").strip())
    if not m:
        return None
    if m.group(4) is not None:
        a = m.group(4)
        if (float(a[:-1]) / 100 if a.endswith("%") else float(a)) < 1.0:
            return None
    return tuple(int(round(float(m.group(i)))) for i in (1, 2, 3))  # type: ignore[return-value]


def _asset(root: str, rel: str) -> tuple[bytes | None, str]:
    """A file directly inside ``root`` with an allowed extension and size, else ``(None, "")``."""
    from urllib.parse import unquote

    rel = unquote(rel.split("?", 1)[0].split("#", 1)[0])
    while rel.startswith("./"):
        rel = rel[2:]
    if not rel or "/" in rel or "\\" in rel or rel.startswith("."):
        return None, ""
    ext = os.path.splitext(rel)[1].lower()
    path = os.path.realpath(os.path.join(root, rel))
    if ext not in ASSET_TYPES or os.path.dirname(path) != root or not os.path.isfile(path):
        return None, ""
    if os.path.getsize(path) > 32 * 2**20:
        return None, ""
    with open(path, "rb") as f:
        return f.read(), ASSET_TYPES[ext]


class Renderer:
    """One headless Chromium (started lazily) rendering HTML strings, a fresh context per page.

    ``viewport``: window (width, height) in CSS pixels; screenshots are full-page (the page's
    whole height, cut at ``max_height``; blocks are measured on the whole page).
    ``timeout_s``: the time limit of one page. ``settle_ms``: a pause after the load event
    for scripts and fonts to finish.
    """

    def __init__(self, executable_path: str | None = None, viewport: tuple[int, int] = (1280, 720),
                 timeout_s: float = 15.0, max_height: int = 16384, settle_ms: int = 50,
                 args: Sequence[str] = CHROMIUM_ARGS):
        self.executable_path = executable_path or os.environ.get("VISCODEX_CHROMIUM") or DEFAULT_CHROMIUM
        self.viewport = (int(viewport[0]), int(viewport[1]))
        self.timeout_s = float(timeout_s)
        self.max_height = int(max_height)
        self.settle_ms = int(settle_ms)
        self.args = list(args)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pw = None
        self._browser = None
        self._pid: int | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def _run(self, coro, timeout: float | None):
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise

    def start(self) -> "Renderer":
        """Starts Chromium if it is not running (again, if it died); raises ``BrowserUnavailable``."""
        with self._lock:
            if self._pid is not None and self._pid != os.getpid():
                # inherited through fork: the loop thread and the browser belong to the parent
                self._loop = self._thread = self._pw = self._browser = None
                self._pid = None
            if self._browser is not None and self._browser.is_connected():
                return self
            if self._browser is not None:
                self._stop_locked()  # the browser died (crash, OOM): start a new one
            try:
                from playwright.async_api import async_playwright
            except ImportError as e:
                raise BrowserUnavailable(
                    "the `playwright` Python package is missing: pip install playwright "
                    "(and apt-get install -y chromium)") from e
            if not os.path.exists(self.executable_path):
                raise BrowserUnavailable(
                    f"Chromium not found at {self.executable_path}: apt-get install -y chromium "
                    "(or set $VISCODEX_CHROMIUM to a Chromium binary)")
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="viscodex-render", daemon=True)
            thread.start()
            self._loop, self._thread, self._pid = loop, thread, os.getpid()

            async def launch():
                pw = await async_playwright().start()
                try:
                    browser = await pw.chromium.launch(
                        executable_path=self.executable_path, headless=True, args=self.args, timeout=60_000,
                        handle_sigint=False, handle_sigterm=False, handle_sighup=False)
                except BaseException:
                    await pw.stop()
                    raise
                return pw, browser

            try:
                self._pw, self._browser = self._run(launch(), 90)
            except Exception as e:
                self._stop_locked()
                raise BrowserUnavailable(
                    f"cannot start Chromium ({self.executable_path}): {type(e).__name__}: {e}") from e
            return self

    def _stop_locked(self) -> None:
        loop, thread, pw, browser = self._loop, self._thread, self._pw, self._browser
        self._loop = self._thread = self._pw = self._browser = None
        if loop is None or self._pid != os.getpid():
            self._pid = None
            return
        self._pid = None

        async def stop():
            for fn in ((browser.close if browser else None), (pw.stop if pw else None)):
                if fn is not None:
                    try:
                        await asyncio.wait_for(fn(), 20)
                    except BaseException:
                        pass
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:  # e.g. route handlers of a page that was torn down
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        if loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(stop(), loop).result(45)
            except BaseException:
                pass
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None and thread is not threading.current_thread():
                thread.join(10)
        if not loop.is_running():
            loop.close()

    def close(self) -> None:
        """Closes the browser, the Playwright driver and the loop thread (safe to call twice)."""
        with self._lock:
            self._stop_locked()

    def __enter__(self) -> "Renderer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def version(self) -> str:
        return self.start()._browser.version

    # -- rendering -------------------------------------------------------------------------------

    def render(self, html: str, screenshot: bool = True, blocks: bool = True,
               assets_dir: str | None = None) -> RenderResult:
        """Loads ``html`` (JS on, network blocked); returns a full-page PNG and/or its text blocks.

        Raises ``RenderTimeout`` past ``timeout_s``, ``RenderError`` when the page crashed,
        ``BrowserUnavailable`` when Chromium cannot be started.
        """
        self.start()
        browser = self._browser
        try:
            return self._run(self._render(browser, html, screenshot, blocks, assets_dir), self.timeout_s + 40)
        except concurrent.futures.TimeoutError:  # teardown hung too: the browser is not healthy
            self.close()
            raise RenderTimeout(f"page did not render within {self.timeout_s:g}s (browser restarted)") from None

    async def _render(self, browser, html, screenshot, blocks, assets_dir) -> RenderResult:
        from playwright.async_api import Error as PWError

        t0 = time.time()
        blocked: list[str] = []
        body = (html or "").encode("utf-8", "replace")
        assets = os.path.realpath(assets_dir) if assets_dir else None
        state: dict[str, Any] = {}

        async def handle(route):
            req = route.request
            url = req.url
            try:
                if (url.split("#", 1)[0] == PAGE_URL and req.is_navigation_request()
                        and req.frame == state.get("main") and not state.get("served")):
                    state["served"] = True
                    return await route.fulfill(status=200, content_type="text/html; charset=utf-8", body=body)
                if assets and url.startswith(PAGE_URL) and req.resource_type != "document":
                    data, ctype = _asset(assets, url[len(PAGE_URL):])
                    if data is not None:
                        return await route.fulfill(status=200, content_type=ctype, body=data)
                blocked.append(url)
                if req.is_navigation_request() and req.frame == state.get("main"):
                    # the page sends itself elsewhere: answer "204 No Content" (nothing is fetched),
                    # so the browser stays on the page instead of showing an error page
                    return await route.fulfill(status=204, body=b"")
                await route.abort("blockedbyclient")
            except PWError:
                pass  # the page went away while we answered

        def ws_handle(ws):
            blocked.append(ws.url)
            return ws.close()

        ctx = await browser.new_context(
            viewport={"width": self.viewport[0], "height": self.viewport[1]}, java_script_enabled=True,
            service_workers="block", accept_downloads=False, device_scale_factor=1)
        try:
            await ctx.route("**/*", handle)
            if hasattr(ctx, "route_web_socket"):
                await ctx.route_web_socket("**/*", ws_handle)
            page = await ctx.new_page()
            state["main"] = page.main_frame
            ctx.on("page", lambda p: None if p is page else asyncio.ensure_future(p.close()))  # pop-ups
            ms = self.timeout_s * 1000
            page.set_default_timeout(ms)
            page.set_default_navigation_timeout(ms)
            try:
                result = await asyncio.wait_for(self._load_and_measure(page, body, screenshot, blocks),
                                                self.timeout_s)
            except asyncio.TimeoutError:
                raise RenderTimeout(f"page did not render within {self.timeout_s:g}s") from None
            except PWError as e:
                if "Timeout" in type(e).__name__:
                    raise RenderTimeout(f"page did not render within {self.timeout_s:g}s") from None
                msg = str(e).strip().splitlines()
                raise RenderError(f"{type(e).__name__}: {msg[0] if msg else ''}") from e
            png, out_blocks, size = result
            return RenderResult(png=png, blocks=out_blocks, page_size=size, blocked=list(blocked),
                                seconds=time.time() - t0)
        finally:
            try:
                await asyncio.wait_for(ctx.close(), 20)
            except BaseException:
                pass

    async def _load_and_measure(self, page, body, screenshot, blocks):
        from playwright.async_api import Error as PWError

        await page.goto(PAGE_URL, wait_until="commit")
        # the document's own load event (Playwright's load-state wait stalls after a cancelled navigation)
        await page.evaluate(_LOADED_JS)
        if self.settle_ms:
            await page.wait_for_timeout(self.settle_ms)
        try:
            await page.evaluate("() => document.fonts ? document.fonts.ready.then(() => 1) : 1")
        except PWError:
            pass
        # without blocks only the page size is needed: the text walk is the slow part on big pages
        info = await page.evaluate(_BLOCKS_JS if blocks else _SIZE_JS)
        W, H = max(int(info["width"]), 1), max(int(info["height"]), 1)
        out_blocks: list[TextBlock] = []
        if blocks:
            raw = info["blocks"]
            unknown = sorted({b["color"] or "" for b in raw if _parse_css_rgb(b["color"]) is None})
            painted = dict(zip(unknown, await page.evaluate(_COLORS_JS, unknown))) if unknown else {}
            for b in raw:
                rgb = _parse_css_rgb(b["color"]) or tuple(painted.get(b["color"] or "", (0, 0, 0)))
                out_blocks.append(TextBlock(
                    text=b["text"], bbox=(b["x"] / W, b["y"] / H, b["w"] / W, b["h"] / H),
                    color=tuple(int(v) for v in rgb), tag=b["tag"]))  # type: ignore[arg-type]
        png = None
        if screenshot:
            kw: dict[str, Any] = {"full_page": True, "type": "png", "animations": "disabled"}
            if H > self.max_height:
                kw["clip"] = {"x": 0, "y": 0, "width": W, "height": self.max_height}
            png = await page.screenshot(**kw)
        return png, out_blocks, (W, H)


# -- one renderer per process ----------------------------------------------------------------------

_shared: Renderer | None = None
_shared_lock = threading.Lock()


def get_renderer(**kw: Any) -> Renderer:
    """The process's shared Renderer, started on first use (``kw`` only counts when it is made)."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared._pid not in (None, os.getpid()):
            _shared = Renderer(**kw)
        r = _shared
    return r.start()


def shutdown() -> None:
    """Closes the shared renderer (run at exit too); the next ``get_renderer()`` starts a new one."""
    global _shared
    with _shared_lock:
        r, _shared = _shared, None
    if r is not None:
        r.close()


atexit.register(shutdown)


def render_html(html: str, **kw: Any) -> RenderResult:
    """Renders with the shared renderer (``kw``: ``screenshot``, ``blocks``, ``assets_dir``)."""
    return get_renderer().render(html, **kw)


def screenshot_png(html: str, assets_dir: str | None = None) -> bytes:
    """Full-page PNG of ``html`` (1280 px wide viewport)."""
    return render_html(html, screenshot=True, blocks=False, assets_dir=assets_dir).png  # type: ignore[return-value]


def text_blocks(html: str, assets_dir: str | None = None) -> list[TextBlock]:
    """The visible text blocks of ``html``."""
    return render_html(html, screenshot=False, blocks=True, assets_dir=assets_dir).blocks
