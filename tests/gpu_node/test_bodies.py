"""Request bodies the generation endpoints refuse before queueing anything."""

from __future__ import annotations

import requests


def test_a_missing_or_non_object_body_is_a_422_and_nothing_runs(node_url: str):
    for data in ("", "[1, 2]", '"a string"'):
        response = requests.post(
            f"{node_url}/sdapi/v1/txt2img", data=data, timeout=30, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 422, (data, response.text)
        assert response.json()["detail"][0]["loc"][0] == "body"


def test_an_unknown_sdapi_path_is_a_json_404(node_url: str):
    response = requests.get(f"{node_url}/sdapi/v1/no-such-endpoint", timeout=30)
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}
