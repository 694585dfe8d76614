"""aiohttp: a form posted with an Idempotency-Key reaches the handler whole.

The middleware reads the body itself (to key and bound it); the handler must still
parse it every way aiohttp offers: ``post()`` for urlencoded and multipart forms,
``multipart()`` for a streamed reader, ``read()`` for bytes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from aiohttp import BodyPartReader, web

from aioidempotency import InMemoryPersistenceLayer
from aioidempotency.integrations.aiohttp import setup_idempotency
from tests.web_apps import run_aiohttp

FIELDS = {"order": "42", "note": "two words"}
FILE = ("receipt.txt", b"line one\nline two\n", "text/plain")


@pytest.fixture
async def site() -> AsyncIterator[tuple[str, list[str]]]:
    runs: list[str] = []

    async def with_post(request: web.Request) -> web.Response:
        form = await request.post()
        runs.append("post")
        fields = {name: form[name] for name in ("order", "note")}
        upload = form.get("receipt")
        size = len(upload.file.read()) if isinstance(upload, web.FileField) else None
        return web.json_response({"fields": fields, "upload_bytes": size})

    async def with_reader(request: web.Request) -> web.Response:
        reader = await request.multipart()
        names: list[str | None] = []
        while (part := await reader.next()) is not None:
            assert isinstance(part, BodyPartReader)
            names.append(part.name)
            await part.read()
        runs.append("reader")
        return web.json_response({"parts": names})

    app = web.Application()
    app.router.add_post("/form", with_post)
    app.router.add_post("/parts", with_reader)
    setup_idempotency(app, InMemoryPersistenceLayer())
    async with run_aiohttp(app) as url:
        yield url, runs


async def test_an_urlencoded_form_with_a_key_is_parsed_and_replayed(
    site: tuple[str, list[str]],
) -> None:
    url, runs = site
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        headers = {"Idempotency-Key": "form-1"}
        first = await client.post("/form", data=FIELDS, headers=headers)
        again = await client.post("/form", data=FIELDS, headers=headers)
    assert first.status_code == 200, first.text
    assert first.json() == {"fields": FIELDS, "upload_bytes": None}
    assert again.json() == first.json()
    assert runs == ["post"]


async def test_a_multipart_form_with_a_key_is_parsed_and_replayed(
    site: tuple[str, list[str]],
) -> None:
    url, runs = site
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        request = client.build_request(
            "POST", "/form", data=FIELDS, files={"receipt": FILE}, headers={"Idempotency-Key": "k2"}
        )
        body, headers = request.read(), dict(request.headers)  # one multipart body, sent twice
        first = await client.post("/form", content=body, headers=headers)
        assert first.status_code == 200, first.text
        again = await client.post("/form", content=body, headers=headers)
    assert first.json() == {"fields": FIELDS, "upload_bytes": len(FILE[1])}
    assert again.status_code == 200
    assert again.json() == first.json()
    assert runs == ["post"]


async def test_a_multipart_reader_with_a_key_sees_every_part(
    site: tuple[str, list[str]],
) -> None:
    url, runs = site
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        files = {"receipt": FILE}
        response = await client.post(
            "/parts", data=FIELDS, files=files, headers={"Idempotency-Key": "form-3"}
        )
    assert response.status_code == 200, response.text
    assert response.json() == {"parts": ["order", "note", "receipt"]}
    assert runs == ["reader"]
