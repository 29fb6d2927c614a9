"""Task webhooks: allowed callback URLs (no private targets), the HMAC signature, retries with backoff driven by an
injected clock against a real receiver on 127.0.0.1, and a signed delivery from a real balancer process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from django.test import override_settings
from django.utils import timezone

from balancer import webhooks
from balancer.dispatcher import Dispatcher
from balancer.models import Task, TaskApi, TaskStatus, WebhookStatus
from balancer.tasks import TaskInputError, submit_task
from tests.balancer import test_tasks_support as support
from tests.balancer.test_tasks_support import (
    WEBHOOK_SECRET,
    BalancerStarter,
    WebhookReceiver,
    as_user,
    submit,
    txt2img_payload,
    wait_for_tasks,
)
from tests.processes import ServerProcess

# Fixtures (pytest finds them among the module's names).
database_url = support.database_url
start_task_balancer = support.start_task_balancer
webhook_receiver = support.webhook_receiver

sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


# ------------------------------------------------------------------------------------------------ callback URLs


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/hook", "http://localhost/hook", "http://10.0.0.5/hook", "http://192.168.1.1/",
        "http://172.16.0.1/", "http://169.254.169.254/latest/meta-data/", "http://[::1]/hook", "http://[fe80::1]/",
        "http://[fc00::1]/", "http://0.0.0.0/", "http://100.64.0.1/", "http://[::ffff:127.0.0.1]/",
        "http://224.0.0.1/",
    ],
)  # fmt: skip
def test_it_refuses_private_and_local_targets(url: str):
    with pytest.raises(webhooks.CallbackURLError, match="private or local"):
        webhooks.check_callback_url(url, allow_private=False)
    assert webhooks.check_callback_url(url, allow_private=True) == url


@pytest.mark.parametrize("url", ["ftp://example.com/x", "javascript:alert(1)", "hook", "http:///path", "file:///etc"])
def test_it_refuses_urls_that_are_not_http(url: str):
    with pytest.raises(webhooks.CallbackURLError, match="http"):
        webhooks.check_callback_url(url, allow_private=True)


def test_it_accepts_public_addresses():
    assert webhooks.check_callback_url("https://93.184.216.34:8443/hook?x=1", allow_private=False)
    assert webhooks.check_callback_url("http://[2606:4700::1111]/hook", allow_private=False)


def test_it_signs_the_raw_body_with_hmac_sha256():
    expected = "sha256=aa9e2e3575f5d7098b6caccd790888c36d5fdb63342a73bada2d6a51747a8494"
    assert webhooks.sign(b'{"a":1}', "secret") == expected
    assert [webhooks.retry_delay(n).total_seconds() for n in range(1, 6)] == [1, 2, 4, 8, 16]


@pytest.mark.django_db
def test_submit_refuses_a_private_callback_unless_allowed():
    body = {"api": TaskApi.TXT2IMG, "payload": {}, "callback_url": "http://127.0.0.1:9/hook"}
    with override_settings(SD_WEBHOOK_ALLOW_PRIVATE=False), pytest.raises(TaskInputError) as refused:
        submit_task(user="alice", body=body)
    assert refused.value.field == "callback_url"
    with override_settings(SD_WEBHOOK_ALLOW_PRIVATE=True):
        assert submit_task(user="alice", body=body).callback_url == body["callback_url"]


# ---------------------------------------------------------------------------------------- delivery and retries


class ManualClock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def webhook_settings() -> Iterator[None]:
    with override_settings(SD_WEBHOOK_SECRET=WEBHOOK_SECRET, SD_WEBHOOK_ALLOW_PRIVATE=True,
                           SD_BALANCER_URL="http://balancer.test"):  # fmt: skip
        yield


def finished_task(callback_url: str) -> Task:
    task = Task.objects.create(user="alice", api=TaskApi.TXT2IMG, payload={}, callback_url=callback_url)
    Task.objects.filter(id=task.id).update(status=TaskStatus.RUNNING, attempts=1)
    task.refresh_from_db()
    assert task.finish(TaskStatus.SUCCEEDED, now=timezone.now(), result={"info": "{}"}, image_names=["tasks/x/0.png"])
    return task


@pytest.mark.django_db(transaction=True)
def test_it_retries_a_failed_delivery_with_backoff(webhook_settings: None, webhook_receiver: WebhookReceiver):
    webhook_receiver.statuses = [500, 503]
    clock = ManualClock()
    dispatcher = Dispatcher(clock=clock)
    task = finished_task(webhook_receiver.url)
    assert task.webhook_status == WebhookStatus.PENDING

    assert dispatcher.deliver_webhooks(now=clock()) == 1
    task.refresh_from_db()
    assert task.webhook_status == WebhookStatus.PENDING and task.webhook_attempts == 1
    assert dispatcher.deliver_webhooks(now=clock()) == 0, "not due before its backoff"
    clock.advance(1)
    assert dispatcher.deliver_webhooks(now=clock()) == 1
    clock.advance(1.5)
    assert dispatcher.deliver_webhooks(now=clock()) == 0, "the second retry waits 2 s"
    clock.advance(0.5)
    assert dispatcher.deliver_webhooks(now=clock()) == 1
    task.refresh_from_db()
    assert task.webhook_status == WebhookStatus.DELIVERED and task.webhook_attempts == 3

    received = webhook_receiver.wait(3, timeout=5)
    assert all(hook.signature_is_valid() for hook in received)
    document = received[-1].document
    assert document["taskId"] == str(task.id) and document["status"] == "succeeded"
    assert document["result"]["images"] == [f"http://balancer.test/task/{task.id}/images/0.png"]
    assert received[-1].headers["X-SD-Timestamp"].isdigit()
    assert dispatcher.deliver_webhooks(now=clock() + timedelta(hours=1)) == 0, "delivered once"


@pytest.mark.django_db(transaction=True)
def test_a_cancelled_task_posts_its_webhook_too(webhook_settings: None, webhook_receiver: WebhookReceiver):
    task = submit_task(user="alice", body={"api": TaskApi.TXT2IMG, "payload": {}, "callback_url": webhook_receiver.url})
    assert task.webhook_status == WebhookStatus.NONE, "no webhook before a terminal state"
    assert task.cancel(now=timezone.now()) and task.webhook_status == WebhookStatus.PENDING
    Dispatcher(clock=ManualClock()).deliver_webhooks(now=timezone.now())
    document = webhook_receiver.wait(1, timeout=5)[0].document
    assert document["status"] == "interrupted" and document["result"] is None
    assert document["error"] == "cancelled by its owner"


@pytest.mark.django_db(transaction=True)
def test_it_gives_up_after_six_failed_deliveries(webhook_settings: None, webhook_receiver: WebhookReceiver):
    webhook_receiver.statuses = [500] * 10
    clock = ManualClock()
    dispatcher = Dispatcher(clock=clock)
    task = finished_task(webhook_receiver.url)
    for _ in range(10):
        dispatcher.deliver_webhooks(now=clock())
        clock.advance(60)
    task.refresh_from_db()
    assert task.webhook_status == WebhookStatus.FAILED and task.webhook_attempts == webhooks.MAX_ATTEMPTS
    assert len(webhook_receiver.wait(webhooks.MAX_ATTEMPTS, timeout=5)) == webhooks.MAX_ATTEMPTS


@pytest.mark.django_db(transaction=True)
def test_it_does_not_follow_redirects(webhook_settings: None, webhook_receiver: WebhookReceiver):
    webhook_receiver.statuses = [302]
    task = finished_task(webhook_receiver.url)
    Dispatcher(clock=ManualClock()).deliver_webhooks(now=datetime(2030, 1, 1, tzinfo=UTC))
    task.refresh_from_db()
    assert task.webhook_status == WebhookStatus.PENDING and task.webhook_attempts == 1


@pytest.mark.django_db(transaction=True)
def test_it_refuses_at_delivery_a_target_that_became_private(webhook_receiver: WebhookReceiver):
    with override_settings(SD_WEBHOOK_ALLOW_PRIVATE=True):
        task = finished_task(webhook_receiver.url)
    with override_settings(SD_WEBHOOK_ALLOW_PRIVATE=False):
        Dispatcher(clock=ManualClock()).deliver_webhooks(now=datetime(2030, 1, 1, tzinfo=UTC))
    task.refresh_from_db()
    assert task.webhook_status == WebhookStatus.FAILED and webhook_receiver.received == []


# ------------------------------------------------------------------------------------------ real processes


@pytest.mark.slow
@sqlite_only
def test_a_real_balancer_delivers_a_signed_webhook_after_a_500(
    two_nodes: list[ServerProcess], start_task_balancer: BalancerStarter, webhook_receiver: WebhookReceiver
):
    webhook_receiver.statuses = [500]
    balancer = start_task_balancer(two_nodes)
    task_id = submit(balancer.url, "alice", txt2img_payload(), callback_url=webhook_receiver.url)
    final = wait_for_tasks(balancer.url, "alice", [task_id])[task_id]
    received = webhook_receiver.wait(2, timeout=30)
    assert len(received) == 2, "one failed delivery, one retry"
    for hook in received:
        assert hook.signature_is_valid(), hook.headers
        assert not hook.signature_is_valid("another secret")
    document = received[-1].document
    assert document["taskId"] == task_id and document["status"] == "succeeded"
    assert document["result"]["images"] == [url.removeprefix(balancer.url) for url in final["result"]["images"]]
    image = requests.get(balancer.url + document["result"]["images"][0], headers=as_user("alice"), timeout=10)
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")


@pytest.mark.slow
@sqlite_only
def test_a_real_balancer_refuses_private_callbacks_without_the_setting(start_task_balancer: BalancerStarter):
    balancer = start_task_balancer([], env={"SD_WEBHOOK_ALLOW_PRIVATE": "0"})
    for url in ("http://127.0.0.1:9/hook", "http://10.1.2.3/hook", "http://169.254.169.254/", "ftp://x/"):
        body: dict[str, Any] = {"api": "/sdapi/v1/txt2img", "payload": txt2img_payload(), "callback_url": url}
        response = requests.post(f"{balancer.url}/task", json=body, headers=as_user("alice"), timeout=10)
        assert response.status_code == 422, response.text
        assert "callback_url" in json.dumps(response.json())
