"""Driving a product through the gateway in end-to-end tests."""

from __future__ import annotations

from tests.conftest import bearer

PROMPTS = ["Where is my order {i}?", "How do I reset my password ({i})?", "Can I get a refund for item {i}?",
           "My parcel {i} is late, what now?"]


def chat_and_rate(c, key, alias, n, rating=None) -> list[str]:
    """n chats through the gateway, each rated (alternating up/down unless rating is given)."""
    ids = []
    for i in range(n):
        r = c.post("/v1/chat/completions", headers=bearer(key), json={
            "model": alias, "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": PROMPTS[i % 4].format(i=i)}]})
        assert r.status_code == 200, r.text
        ids.append(r.headers["x-interaction-id"])
    for i, iid in enumerate(ids):
        body = {"interaction_id": iid, "rating": rating or ("up" if i % 2 else "down"),
                "rater_id": f"u{i % 5}"}
        if rating is None and i % 4 == 0:
            body["correction"] = "Thanks for asking: your order ships tomorrow, user@example.com."
        assert c.post("/v1/feedback", headers=bearer(key), json=body).status_code == 201
    return ids
