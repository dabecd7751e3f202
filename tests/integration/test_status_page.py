"""The status page in a real headless Chromium: it follows the daemon live
(no reload) through an added node, an export, a job and a migration; it has
nothing that could change the daemon; 1000 nodes render within a second."""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

from qmpd.nbd.client import NbdClient
from tests.integration.migration_helpers import Cluster, create_qcow2, http_peer, start
from tests.support.cdp import Browser, screenshot_path


async def in_thread(fn: Any, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


async def test_page_follows_the_daemon_live(mig: Cluster) -> None:
    image = create_qcow2(mig.dir / "disk.qcow2", "64M")
    src, sport = http_peer(mig, "src")
    dst, dport = http_peer(mig, "dst", incoming="defer")
    start(src, dst)
    page = f"http://127.0.0.1:{sport}/"
    with urllib.request.urlopen(page, timeout=10) as resp:
        html = resp.read().decode()
    # Everything is in the one file: no script or style fetched from elsewhere.
    assert "<script src" not in html and "http://" not in html and "https://" not in html
    async with Browser() as browser:
        await browser.goto(page)
        await browser.wait_for("document.body.dataset.rendered")
        assert await browser.evaluate("document.getElementById('run-state').textContent") \
            == "running"
        assert await browser.evaluate("document.getElementById('node-count').textContent") == "0"
        # Nothing on the page can send anything: no forms, buttons or inputs.
        assert await browser.evaluate(
            "document.querySelectorAll('form,button,input,select,textarea,a[href]').length") == 0
        await browser.evaluate("window.notReloaded = true")

        await in_thread(src.add_disk, image)
        await browser.wait_for("!!document.querySelector('[data-node=\"disk\"]')")
        assert "active" in await browser.evaluate(
            "document.querySelector('[data-node=\"disk\"] .pill').textContent")
        # The tree: the file node below the qcow2 one, with the locks it holds.
        detail = await browser.evaluate(
            "document.querySelector('[data-node=\"disk\"] li[data-node]').textContent")
        assert detail.startswith("file: ") and "locks: consistent read, write" in detail
        # I/O sends no event: the page still shows the caches at work within its tick.
        await in_thread(src.qemu_io, "disk", "write 0 64k")
        await in_thread(src.qemu_io, "disk", "read 0 64k")
        await browser.wait_for(
            "/l2 cache [0-9.]+% hits/.test("
            "document.querySelector('[data-node=\"disk\"] .detail').textContent)")

        nbd = mig.dir / "nbd.sock"
        await in_thread(src.ok, "nbd-server-start",
                        {"addr": {"type": "unix", "data": {"path": str(nbd)}}})
        await in_thread(src.ok, "block-export-add",
                        {"type": "nbd", "id": "e0", "node-name": "disk", "name": "d0"})
        await browser.wait_for("!!document.querySelector('[data-export=\"e0\"]')")
        # A client connects: the page names it, and forgets it once it leaves.
        async with await NbdClient.connect(f"nbd+unix:///d0?socket={nbd}") as client:
            await client.read(0, 512)
            await browser.wait_for(
                "document.querySelector('[data-export=\"e0\"]').textContent"
                ".includes('1 client(s)')")
        await browser.wait_for(
            "document.querySelector('[data-export=\"e0\"]').textContent"
            ".includes('0 client(s)')")

        await in_thread(src.ok, "blockdev-create", {"job-id": "c0", "options": {
            "driver": "file", "filename": str(mig.dir / "new.raw"), "size": 1 << 20}})
        await browser.wait_for(
            "document.querySelector('[data-job=\"c0\"]')?.textContent.includes('concluded')")
        await in_thread(src.ok, "job-dismiss", {"id": "c0"})
        await browser.wait_for("!document.querySelector('[data-job=\"c0\"]')")
        await in_thread(src.ok, "block-export-del", {"id": "e0"})
        await in_thread(src.ok, "nbd-server-stop")

        # A running job: its bar follows current/total-progress, which move
        # without an event (the page's tick), and it goes when the job does.
        await in_thread(src.qemu_io, "disk", "write 0 8M")
        await in_thread(src.ok, "blockdev-add", {
            "driver": "qcow2", "node-name": "tgt", "file": {
                "driver": "file", "filename": str(create_qcow2(mig.dir / "tgt.qcow2", "64M"))}})
        await in_thread(src.ok, "blockdev-mirror", {
            "job-id": "m0", "device": "disk", "target": "tgt", "sync": "full",
            "speed": 1 << 20})
        bar = "document.querySelector('[data-job=\"m0\"] progress')"
        await browser.wait_for(f"{bar} && {bar}.value > 0 && {bar}.value < {bar}.max")
        first = await browser.evaluate(f"{bar}.value")
        await browser.wait_for(f"{bar}.value > {first}")
        jobs = await in_thread(src.ok, "query-jobs")
        shown = await browser.evaluate(f"[{bar}.value, {bar}.max]")
        # The page's numbers are the job's own (as of its last status).
        assert 0 < shown[0] <= jobs[0]["current-progress"], (shown, jobs)
        assert shown[0] < shown[1] <= jobs[0]["total-progress"], (shown, jobs)
        await in_thread(src.ok, "block-job-cancel", {"device": "m0", "force": True})
        await browser.wait_for("!document.querySelector('[data-job=\"m0\"]')")
        await in_thread(src.ok, "blockdev-del", {"node-name": "tgt"})

        await in_thread(dst.add_disk, image)
        uri = f"unix:{mig.dir / 'mig.sock'}"
        await in_thread(dst.ok, "migrate-incoming", {"uri": uri})
        # Paused before the switchover: the bar shows part of the way.
        await in_thread(src.ok, "migrate-set-capabilities", {"capabilities": [
            {"capability": "pause-before-switchover", "state": True}]})
        await in_thread(src.ok, "migrate", {"uri": uri})
        await browser.wait_for(
            "document.getElementById('migration').dataset.status === 'pre-switchover'")
        value, top = await browser.evaluate(
            "[document.getElementById('migration-progress').value,"
            " document.getElementById('migration-progress').max]")
        assert 0 < value < top
        assert "paused before switchover" in await browser.evaluate(
            "document.getElementById('migration').textContent")
        await in_thread(src.ok, "migrate-continue", {"state": "pre-switchover"})
        await browser.wait_for(
            "document.getElementById('migration').dataset.status === 'completed'")
        assert await browser.evaluate(
            "document.getElementById('migration-progress').value"
            " === document.getElementById('migration-progress').max")
        timings = await browser.evaluate("document.getElementById('handover').textContent")
        assert "downtime" in timings and "total-time" in timings
        await browser.wait_for(
            "document.getElementById('run-state').textContent === 'postmigrate'")
        await browser.wait_for(
            "document.querySelector('[data-node=\"disk\"] .pill').textContent === 'inactive'")
        events = await browser.evaluate("document.getElementById('events').textContent")
        assert " STOP" in events and "BLOCK_EXPORT_DELETED" in events
        assert await browser.evaluate("window.notReloaded") is True
        # All the page ever asked for: itself and the event stream, with GET.
        await browser.evaluate("1")  # collect the protocol events received so far
        made = [(m, url) for m, url in browser.requests() if not url.startswith("data:")]
        assert made and all(method == "GET" for method, _ in made), made
        assert {url.removeprefix(page) for _, url in made} <= {"", "api/events"}, made
        shot = screenshot_path()
        if shot is not None:
            await browser.screenshot(shot)
    # The destination's page shows the node it now runs.
    async with Browser() as browser:
        await browser.goto(f"http://127.0.0.1:{dport}/")
        await browser.wait_for(
            "document.querySelector('[data-node=\"disk\"] .pill')?.textContent === 'active'")
        # ... and how long its activation took, in all and per node.
        timings = await browser.evaluate("document.getElementById('handover').textContent")
        assert "activation-time" in timings and "slowest node activations: " in timings
        assert "activated in " in await browser.evaluate(
            "document.querySelector('[data-node=\"disk\"] .detail').textContent")
    for peer in (src, dst):
        peer.quit()


async def test_thousand_nodes_render_within_a_second(mig: Cluster) -> None:
    peer, port = http_peer(mig, "many")
    start(peer)

    def add_all() -> None:
        # 500 trees of two: a raw node over its null-co child.
        for i in range(500):
            peer.ok("blockdev-add", {"driver": "raw", "node-name": f"r{i}", "file": {
                "driver": "null-co", "node-name": f"n{i}", "size": 1 << 30}})

    await in_thread(add_all)
    async with Browser() as browser:
        await browser.goto(f"http://127.0.0.1:{port}/")
        await browser.wait_for(
            "document.getElementById('node-count').textContent === '1000'", timeout=30)
        # Correct: every root once at the top, every child under its own parent.
        assert await browser.evaluate("document.querySelectorAll('#nodes > li').length") == 500
        assert await browser.evaluate(
            "[...document.querySelectorAll('#nodes > li > ul > li')]"
            ".every(li => li.dataset.node === 'n' + li.parentNode.parentNode.dataset.node.slice(1))")
        assert await browser.evaluate(
            "document.querySelectorAll('#nodes li[data-node]').length") == 1000
        render_ms = float(await browser.evaluate("document.body.dataset.renderMs"))
        assert render_ms < 1000, render_ms
        # Still live at that size: one more node shows up without a reload.
        await in_thread(peer.ok, "blockdev-add",
                        {"driver": "null-co", "node-name": "extra", "size": 1 << 20})
        await browser.wait_for("!!document.querySelector('[data-node=\"extra\"]')", timeout=10)
        render_ms = float(await browser.evaluate("document.body.dataset.renderMs"))
        assert render_ms < 1000, render_ms
    peer.quit()
