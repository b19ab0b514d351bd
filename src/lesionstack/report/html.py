"""A self-contained HTML page: inline CSS, figures as relative links to PNGs in the same folder,
no script and no external asset, so it opens offline and can be zipped or copied as one folder."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
 padding:0 1em;color:#1d232b;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{border-bottom:2px solid #d9dee8;padding-bottom:.2em;margin-top:2em}
h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:.6em 0 1em;font-size:.9em}
th,td{border:1px solid #d9dee8;padding:.25em .6em;text-align:right}
th{background:#eef1f6} td:first-child,th:first-child{text-align:left} td:not(:first-child){white-space:nowrap}
table.text td,table.text th{text-align:left;white-space:normal}
tr.hl td{background:#f5f8ff;font-weight:600}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #e3e6eb}
figcaption{font-size:.85em;color:#555}
.note{background:#fff7df;border-left:4px solid #e0a800;padding:.4em .8em;margin:.5em 0;font-size:.9em}
.meta{color:#555;font-size:.9em} code{background:#f2f4f7;padding:0 .25em}
"""


def esc(value: Any) -> str:
    return html.escape(str(value))


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], highlight: Sequence[int] = (), *,
          text: bool = False) -> str:
    """An HTML table; cells are escaped, rows whose index is in `highlight` are emphasised; `text`: every
    column left-aligned and wrapping (settings, not numbers)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        ('<tr class="hl">' if i in highlight else "<tr>") + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
        for i, row in enumerate(rows)
    )
    attr = ' class="text"' if text else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure(src: str, caption: str) -> str:
    """A figure referencing a PNG beside the page by its bare file name."""
    return f'<figure><img src="{esc(src)}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>'


def note(text: str) -> str:
    return f'<div class="note">{esc(text)}</div>'


def paragraph(text: str) -> str:
    return f"<p>{esc(text)}</p>"


def section(title: str, *parts: str) -> str:
    return f"<section><h2>{esc(title)}</h2>{''.join(parts)}</section>"


def page(title: str, meta: str, body: Sequence[str]) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{esc(title)}</h1><p class=\"meta\">{esc(meta)}</p>{''.join(body)}</body></html>\n"
    )
