"""A report seen through a real browser: headless Chromium (Debian's ``chromium`` package).

``probe(html)`` loads a copy of the page with a small script added that, once the page has loaded,
records every image's decoded size, every resource the page fetched and every error event (script
errors and failed loads, caught in the capture phase), and reads that record back from Chromium's
``--dump-dom``. ``external_refs(html)`` lists, from the source, every reference that would leave the
file (``src``/``href``/``srcset``/``poster`` attributes and CSS ``url()``/``@import`` not pointing into
the page or at a ``data:`` URI). ``screenshot(html, png)`` renders the page to a PNG.

    python tests/browser.py REPORT.html OUT.png [WIDTH HEIGHT]   # a screenshot (docs/report.png)
"""

from __future__ import annotations

import html as html_lib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

__all__ = ["find_chromium", "probe", "external_refs", "screenshot"]

_HEAD = ("<script>window.__errors=[];addEventListener('error',function(e){var t=e.target||{};"
         "window.__errors.push(String(e.message||t.src||t.href||'error'))},true);</script>")
_PROBE = """<script>addEventListener('load',function(){
var r={errors:window.__errors,resources:performance.getEntriesByType('resource').map(function(e){return e.name}),
images:[],sections:[]};
document.querySelectorAll('img').forEach(function(i){var f=i.closest('[data-figure]');var q=i.closest('section.q');
r.images.push({w:i.naturalWidth,h:i.naturalHeight,complete:i.complete,data:i.src.indexOf('data:image/')===0,
figure:f?f.getAttribute('data-figure'):null,section:q?q.id:null})});
document.querySelectorAll('section.q').forEach(function(q){r.sections.push({id:q.id,verdict:q.getAttribute('data-verdict'),
text:q.querySelector('.qtext').innerText})});
r.details=document.querySelectorAll('details').length;
var p=document.createElement('pre');p.id='pflatents-probe';p.textContent=JSON.stringify(r);document.body.appendChild(p)});
</script>"""


def find_chromium() -> str | None:
    """The Chromium (or Chrome) executable on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(args: list[str], tmp: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("chromium not found on PATH")
    cmd = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--no-first-run",
           "--disable-extensions", "--disable-background-networking", f"--user-data-dir={tmp / 'profile'}", *args]
    env = {"HOME": str(tmp), "PATH": "/usr/bin:/bin"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def probe(page: str | Path) -> dict:
    """Load ``page`` in headless Chromium and return the probe's record (see the module docstring)."""
    src = Path(page).read_text()
    with tempfile.TemporaryDirectory(prefix="pflatents-browser-") as d:
        tmp = Path(d)
        copy = tmp / "page.html"
        copy.write_text(src.replace("<head>", "<head>" + _HEAD, 1).replace("</body>", _PROBE + "</body>", 1))
        res = _run(["--virtual-time-budget=10000", "--dump-dom", copy.as_uri()], tmp)
    m = re.search(r'<pre id="pflatents-probe">(.*?)</pre>', res.stdout, re.S)
    if not m:
        raise RuntimeError(f"chromium produced no probe record (exit {res.returncode}): {res.stderr[-2000:]}")
    return json.loads(html_lib.unescape(m.group(1)))


class _Refs(HTMLParser):
    ATTRS = {"src", "href", "srcset", "poster", "data", "action", "background"}

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.css: list[str] = []
        self._style = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        for k, v in attrs:
            if k in self.ATTRS and v and not v.startswith(("data:", "#")):
                self.refs.append(f"<{tag} {k}={v[:80]}>")
            if k == "style" and v:
                self.css.append(v)
        self._style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        self._style = False

    def handle_data(self, data: str) -> None:
        if self._style:
            self.css.append(data)


def external_refs(page: str | Path) -> list[str]:
    """References in the page's source that point outside the file (empty for a self-contained page)."""
    parser = _Refs()
    parser.feed(Path(page).read_text())
    out = list(parser.refs)
    for css in parser.css:
        out += [f"css url({u[:80]})" for u in re.findall(r"url\(\s*['\"]?([^'\")]+)", css) if not u.startswith("data:")]
        out += [f"css {m[:80]}" for m in re.findall(r"@import[^;]+", css)]
    return out


def screenshot(page: str | Path, png: str | Path, width: int = 1280, height: int = 1500) -> Path:
    """Render ``page`` at ``width`` x ``height`` CSS pixels into ``png``."""
    png = Path(png).resolve()
    with tempfile.TemporaryDirectory(prefix="pflatents-browser-") as d:
        res = _run([f"--window-size={width},{height}", f"--screenshot={png}", "--virtual-time-budget=10000",
                    Path(page).resolve().as_uri()], Path(d))
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (exit {res.returncode}): {res.stderr[-2000:]}")
    return png


if __name__ == "__main__":
    if len(sys.argv) not in (3, 5):
        sys.exit("usage: python tests/browser.py REPORT.html OUT.png [WIDTH HEIGHT]")
    size = [int(v) for v in sys.argv[3:5]] or [1280, 1500]
    out = screenshot(sys.argv[1], sys.argv[2], *size)
    from PIL import Image

    Image.open(out).convert("RGB").quantize(colors=128).save(out, optimize=True)  # a palette PNG: small
    print(f"{out}: {out.stat().st_size // 1024} KB")
