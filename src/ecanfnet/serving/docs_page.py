"""GET /docs: the OpenAPI document rendered as one self-contained HTML page (no script, no external asset).

FastAPI's own /docs loads Swagger UI from a CDN, so it is blank on a machine without internet access;
this page is built on the server from the same document and works offline. The document itself stays
at /openapi.json for tools and code generators.
"""

from __future__ import annotations

from html import escape
from typing import Any

# Nothing but the page's own inline style may load, and no script runs.
DOCS_PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
                                               "form-action 'none'; frame-ancestors 'none'",
                     "X-Content-Type-Options": "nosniff"}
METHODS = ("get", "post", "put", "patch", "delete")
STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
code, .path { font-family: ui-monospace, monospace; }
section { border: 1px solid #ddd; border-radius: 6px; margin: 1rem 0; padding: .6rem 1rem; }
.method { display: inline-block; min-width: 4rem; font-weight: bold; text-transform: uppercase; }
.get { color: #0a6; } .post { color: #06c; }
.key { font-size: 85%; background: #fe8; border-radius: 4px; padding: 0 .4rem; margin-left: .6rem; }
table { border-collapse: collapse; margin: .3rem 0; } td, th { text-align: left; padding: .1rem .8rem .1rem 0; }
"""


def docs_page(schema: dict[str, Any]) -> str:
    """The page for an OpenAPI document: title, security schemes, then each operation with its parameters,
    request body types and responses."""
    info = schema.get("info", {})
    title = f"{info.get('title', 'API')} {info.get('version', '')}".strip()
    parts = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>",
             f"<p>{escape(info.get('description', ''))}</p>",
             "<p>The machine-readable document: <a href=\"/openapi.json\"><code>/openapi.json</code></a>.</p>"]
    schemes = schema.get("components", {}).get("securitySchemes", {})
    if schemes:
        parts.append("<h2>API key</h2><ul>")
        parts += [f"<li><code>{escape(name)}</code>: {escape(s.get('description', ''))}</li>"
                  for name, s in schemes.items()]
        parts.append("</ul>")
    parts.append("<h2>Routes</h2>")
    for path, item in schema.get("paths", {}).items():
        for method in METHODS:
            if method in item:
                parts.append(_operation(path, method, item[method]))
    parts.append("</body></html>")
    return "\n".join(parts)


def _operation(path: str, method: str, op: dict[str, Any]) -> str:
    """One route: method, path, summary, key marker, parameters, body types and responses."""
    key = "<span class=\"key\">API key</span>" if op.get("security") else ""
    html = [f"<section><div><span class=\"method {method}\">{method}</span> <span class=\"path\">{escape(path)}"
            f"</span>{key}</div>"]
    if op.get("summary"):
        html.append(f"<p>{escape(op['summary'])}</p>")
    params = op.get("parameters", [])
    if params:
        rows = "".join(f"<tr><td><code>{escape(p['name'])}</code></td><td>{escape(p.get('in', ''))}</td>"
                       f"<td>{'required' if p.get('required') else 'optional'}</td>"
                       f"<td>{escape(p.get('description', '') or '')}</td></tr>" for p in params)
        html.append(f"<table><tr><th>parameter</th><th>in</th><th></th><th></th></tr>{rows}</table>")
    body = op.get("requestBody", {}).get("content", {})
    if body:
        html.append("<p>Body: " + ", ".join(f"<code>{escape(t)}</code>" for t in body) + "</p>")
    responses = op.get("responses", {})
    if responses:
        rows = "".join(f"<tr><td>{escape(str(code))}</td><td>{escape(r.get('description', ''))}</td></tr>"
                       for code, r in responses.items())
        html.append(f"<table><tr><th>status</th><th>when</th></tr>{rows}</table>")
    html.append("</section>")
    return "\n".join(html)
