"""report.md and report.html of a sweep folder from a summary, plots and tables.

One writer for every report of a sweep folder (`bigbatch.study.report` for the critical batch
size, `bigbatch.study.axes_report` for a sweep with further axes). The HTML embeds its plots
(base64 PNG), so the one file can be mailed or opened anywhere. No torch and no Ray.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from bigbatch import folders

Table = tuple[str, list[str], list[list[str]]]


def write_documents(sweep_dir: Path, title: str, summary: list[str], made: list[str], missing: list[str],
                    tables: list[Table], sections: list[tuple[str, list[str]]] = ()) -> Path:
    """report.md and report.html: the summary as a list, the plots (`<name>.png` in `sweep_dir`),
    named paragraphs (`sections`: (heading, lines)), then the tables; returns the report.html path."""
    md = [f"# {title}", ""] + [f"- {l}" for l in summary] + [""]
    for name in made:
        md += [f"![{name}]({name}.png)", ""]
    if missing:
        md += [f"Not plotted (no data): {', '.join(missing)}.", ""]
    for heading, lines in sections:
        md += [f"## {heading}", ""] + [f"- {l}" for l in lines] + [""]
    for caption, head, rows in tables:
        md += [f"## {caption}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        md += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows] + [""]
    folders.SweepFolder(sweep_dir).report_md.write_text("\n".join(md))

    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}img{max-width:100%}</style></head><body>",
             f"<h1>{esc(title)}</h1><ul>"] + [f"<li>{esc(l)}</li>" for l in summary] + ["</ul>"]
    for name in made:
        data = base64.b64encode((sweep_dir / f"{name}.png").read_bytes()).decode()
        parts.append(f"<p><img alt='{name}' src='data:image/png;base64,{data}'></p>")
    for heading, lines in sections:
        parts.append(f"<h2>{esc(heading)}</h2><ul>" + "".join(f"<li>{esc(l)}</li>" for l in lines) + "</ul>")
    for caption, head, rows in tables:
        parts.append(f"<h2>{esc(caption)}</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    parts.append("</body></html>")
    out = folders.SweepFolder(sweep_dir).report_html
    out.write_text("\n".join(parts))
    return out
