"""GET /openapi.json and /docs describe exactly the HTTP routes a process serves: every route
mounted is listed (with its role and errors), and every listed operation answers (never 404 or 405)."""

from __future__ import annotations

import httpx
from labeling import TOKENS, start, url

REWARD = {
    ("POST", "/get_reward"),
    ("POST", "/classify"),
    ("POST", "/v1/classify"),
    ("POST", "/pooling"),
    ("POST", "/v1/pooling"),
    ("GET", "/v1/models"),
    ("GET", "/version"),
}
LABELING = {
    ("GET", "/"),
    ("GET", "/admin"),
    ("GET", "/static/{path}"),
    ("GET", "/api/me"),
    ("POST", "/api/next"),
    ("POST", "/api/tasks/{task_id}/renew"),
    ("POST", "/api/tasks/{task_id}/skip"),
    ("POST", "/api/tasks/{task_id}/label"),
    ("GET", "/api/progress"),
    ("GET", "/api/admin/agreement"),
}
ALWAYS = {("GET", "/health"), ("GET", "/ping"), ("GET", "/openapi.json"), ("GET", "/docs")}


def _operations(doc: dict) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}


def _routed(base: str, method: str, path: str) -> bool:
    """Whether the server routes the operation: anything but Starlette's own 404 (no route) or 405
    (no such method); an unknown task's 404 is the route's answer."""
    concrete = path.replace("{path}", "page.css").replace("{task_id}", "t-1")
    headers = {"Authorization": f"Bearer {TOKENS['admin']}"}
    r = httpx.request(method, base + concrete, json={} if method == "POST" else None, headers=headers, timeout=60)
    unrouted = r.status_code == 404 and "json" in r.headers.get("content-type", "") and r.json()["error"] == "Not Found"
    return not unrouted and r.status_code != 405


def test_openapi_lists_exactly_the_routes_served(home, tiny_rm_dir):
    both = start(with_model=True, model=str(tiny_rm_dir), precision="fp32")  # model and store: every route
    store_only = start()
    try:
        for srv, expected in ((both, ALWAYS | REWARD | LABELING), (store_only, ALWAYS | LABELING)):
            base = url(srv)
            r = httpx.get(base + "/openapi.json")  # open: no token
            assert r.status_code == 200, r.text
            doc = r.json()
            assert doc["openapi"].startswith("3.1") and doc["info"]["title"] == "rm-service HTTP"
            listed = _operations(doc)
            metrics = {("GET", "/metrics")} if httpx.get(base + "/metrics").status_code == 200 else set()
            assert listed == expected | metrics
            assert not _routed(base, "GET", "/no-such-route")
            for method, path in listed:  # every listed operation is served
                assert _routed(base, method, path), (method, path)
            for path, ops in doc["paths"].items():
                for method, op in ops.items():
                    assert op["summary"] and op["summary"] != f"{method.upper()} {path}", (method, path)
                    assert op["tags"][0] in {t["name"] for t in doc["tags"]}
            # Roles: open routes need nothing, the others a bearer token or the token as Basic password.
            assert doc["paths"]["/health"]["get"]["security"] == []
            assert doc["paths"]["/api/next"]["post"]["x-role"] == "labeler"
            assert doc["paths"]["/api/next"]["post"]["security"] == [{"bearer": []}, {"basic": []}]
            assert "401" in doc["paths"]["/api/next"]["post"]["responses"]
            page = httpx.get(base + "/docs")
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert all(f"<code>{path}</code>" in page.text for path in doc["paths"])
        # The reward routes: vLLM's error shape on vLLM's paths, overload and loading answers.
        doc = httpx.get(url(both) + "/openapi.json").json()
        classify = doc["paths"]["/classify"]["post"]
        assert classify["x-role"] == "scorer" and {"400", "401", "403", "429", "503"} <= set(classify["responses"])
        schema = classify["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
        assert schema == "#/components/schemas/VllmError"
        schema = doc["paths"]["/get_reward"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]
        assert schema["$ref"] == "#/components/schemas/Error"
    finally:
        both.stop()
        store_only.stop()
