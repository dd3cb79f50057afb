"""The report's page frame: inline styles for screen and print, and nothing that loads from outside.

The one script opens every collapsed section before printing, so a printout holds the details too.
"""

from __future__ import annotations

import html

__all__ = ["STYLE", "page"]

STYLE = """
:root{--yes:#188038;--no:#c5221f;--cannot:#b06000;--na:#5f6368;--ink:#202124;--mute:#5f6368;--line:#dadce0;
--soft:#f1f3f4}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;color:var(--ink);background:#fff;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif}
main{max-width:1240px;margin:0 auto;padding:20px 28px 56px}
header h1{font-size:24px;margin:0 0 2px}
header .meta{color:var(--mute);font-size:13px;margin:0;overflow-wrap:anywhere}
header .overall{margin:8px 0 4px;font-size:14px}
code{font-size:12.5px;background:var(--soft);padding:0 3px;border-radius:3px;overflow-wrap:anywhere}
.q{--c:var(--na);display:grid;grid-template-columns:minmax(280px,5fr) minmax(0,7fr);gap:14px 26px;margin:16px 0;
padding:16px 20px;border:1px solid var(--line);border-left:7px solid var(--c);border-radius:8px;
break-inside:avoid;page-break-inside:avoid}
.q.yes{--c:var(--yes)}.q.no{--c:var(--no)}.q.cannot-tell{--c:var(--cannot)}.q.not-checked{--c:var(--na)}
.q h2{font-size:18px;line-height:1.3;margin:0 0 8px}
.qn{display:inline-block;width:1.5em;height:1.5em;line-height:1.5em;margin-right:8px;text-align:center;
border-radius:50%;background:var(--soft);color:var(--mute);font-size:14px}
.verdict{margin:0 0 6px}
.badge{display:inline-block;padding:2px 14px;border-radius:14px;background:var(--c);color:#fff;font-weight:700;
font-size:15px;letter-spacing:.05em;text-transform:uppercase}
.decide{margin:4px 0 8px}
.decide .value{display:block;font-size:32px;font-weight:700;line-height:1.15;color:var(--c);
font-variant-numeric:tabular-nums}
.decide .what,.effect .what{display:block;font-size:13px;color:var(--mute)}
.effect{margin:4px 0 8px}
.effect .evalue{font-size:20px;font-weight:700;font-variant-numeric:tabular-nums}
.effect .eci{font-size:14px;color:var(--ink)}
.facts{margin:0 0 8px;padding-left:18px;font-size:13px}
.answer{font-size:14px;margin:6px 0}
.change{font-size:13px;color:var(--mute);margin:6px 0 0}
.qfig{min-width:0}
.fig{margin:0 0 10px}
.fig img{display:block;max-width:100%;height:auto;margin:0 auto}
figcaption{font-size:12px;color:var(--mute);margin-top:2px}
.nofig{color:var(--mute);font-style:italic}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid var(--line);padding:3px 8px;text-align:left;vertical-align:top;overflow-wrap:break-word}
th{background:var(--soft);font-weight:600}
td{font-variant-numeric:tabular-nums}
table.nums{width:100%;font-size:12.5px}
table.nums th{width:42%;font-weight:500}
.tw{max-width:100%;overflow-x:auto}
h2.dh{font-size:18px;margin:28px 0 4px}
details{border-top:1px solid var(--line);padding:4px 0}
details:last-child{border-bottom:1px solid var(--line)}
summary{cursor:pointer;font-weight:600;font-size:15px;padding:6px 0}
details>*:not(summary){margin-left:18px}
details img{max-width:100%;height:auto}
details p{font-size:14px}
@media (max-width:880px){.q{grid-template-columns:minmax(0,1fr)}main{padding:12px}}
@media print{
@page{margin:12mm}
*{-webkit-print-color-adjust:exact;print-color-adjust:exact}
body{font-size:10pt}
main{max-width:none;padding:0}
.q{grid-template-columns:minmax(0,5fr) minmax(0,7fr);margin:8px 0;padding:10px 12px}
.decide .value{font-size:22pt}
.tw{overflow:visible}
summary{list-style:none}
summary::-webkit-details-marker{display:none}
details{break-inside:auto}
table,figure{break-inside:avoid}
}
"""

_SCRIPT = "addEventListener('beforeprint',function(){document.querySelectorAll('details').forEach(function(d){d.open=true})});"


def page(title: str, body: str) -> str:
    """A standalone HTML document around ``body`` (already HTML)."""
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body><main>\n{body}\n</main>"
            f"<script>{_SCRIPT}</script></body></html>\n")
