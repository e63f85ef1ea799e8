"""Where a batch's rows are drawn: the local engine (rows batched into one engine call each), or a running
deployment (one request per row, many in flight, so the deployment's dynamic batching fills its batches).

Both yield `(rows, results)` as work finishes, each result an `(image, nsfw)` pair or the error text."""
from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Iterable, Iterator

from ..errors import FastSDError, InvalidParameter
from ..serving.errors import DeploymentError, plain_message
from .inputs import Row


@dataclass
class Options:
    """The generation options every row shares (the `generate` flags)."""
    steps: int
    guidance: float
    height: int | None
    width: int | None
    scheduler: str | None
    negative: str | None  # for rows without a negative_prompt value
    seed: int             # a row without a seed gets seed + its row number
    eta: float = 0.0      # DDIM's eta / TCD's gamma

    def row_seed(self, row: Row) -> int:
        return row.seed if row.seed is not None else self.seed + row.number

    def row_negative(self, row: Row) -> str:
        return row.negative_prompt if row.negative_prompt is not None else (self.negative or "")


def call_key(row: Row) -> tuple:
    """Rows that one engine call can draw together: the same task, image size, strength and LoRA set (and noise
    level, depth maps given or not)."""
    return (row.task, row.size, row.strength, row.lora or "", row.noise_level, row.depth_map is not None)


def chunks(rows: list[Row], size: int) -> list[list[Row]]:
    """Fixed groups of `size` over the runnable rows in input order, per call_key (the kinds in the order
    each first appears). The same input always gives the same groups, so
    a resumed batch puts each row in the engine call it had in an uninterrupted run (batched GEMMs round
    differently per batch composition; fixed groups keep images bit-identical)."""
    by_key: dict[tuple, list[Row]] = {}
    for r in rows:
        by_key.setdefault(call_key(r), []).append(r)
    return [same[i:i + size] for same in by_key.values() for i in range(0, len(same), size)]


class LocalRunner:
    """`loras`: the batch's --lora-dir as a serving.loras.LoraCatalog (None: rows may name no adapter);
    `default`: the --lora set, [(path, scale), ...], for rows whose `lora` is empty (already fused)."""

    def __init__(self, engine, options: Options, batch_size: int, loras=None, default=()):
        self.engine, self.options, self.batch_size, self.loras = engine, options, batch_size, loras
        self.default = list(default)
        self.active = ()  # the named LoRA set fused into the engine now; () is the default set

    def groups(self, rows: list[Row]) -> list[list[Row]]:
        return chunks(rows, self.batch_size)

    def _use_loras(self, text: str | None) -> None:
        if text and self.loras is None:
            raise InvalidParameter("lora", text, "no adapter: this batch has no --lora-dir to take names from")
        wanted = self.loras.parse(text) if text else ()
        if wanted != self.active:
            self.engine.set_loras(self.loras.refs(wanted) if wanted else self.default)
            self.active = wanted

    def _call(self, rows: list[Row]):
        o = self.options
        self._use_loras(rows[0].lora)
        loaded = [r.load_images() for r in rows]
        image = [i for i, _ in loaded] if rows[0].image is not None else None
        mask = [m for _, m in loaded] if rows[0].mask_image is not None else None
        result = self.engine.generate([r.prompt for r in rows], [o.row_negative(r) for r in rows],
                                      num_images_per_prompt=1, num_inference_steps=o.steps, guidance_scale=o.guidance,
                                      height=o.height, width=o.width, seed=[o.row_seed(r) for r in rows],
                                      scheduler=o.scheduler, progress=False, image=image, mask_image=mask,
                                      strength=rows[0].strength, eta=o.eta, noise_level=rows[0].noise_level,
                                      depth_map=[r.depth_map for r in rows] if rows[0].depth_map else None)
        return list(zip(result.images, result.nsfw_content_detected))

    def run(self, groups: Iterable[list[Row]]) -> Iterator[tuple[list[Row], list]]:
        for group in groups:
            try:
                yield group, self._call(group)
            except FastSDError as e:
                if len(group) == 1:
                    yield group, [str(e)]
                    continue
                for row in group:  # find the row at fault; the others still get their images
                    try:
                        yield [row], self._call([row])
                    except FastSDError as e1:
                        yield [row], [str(e1)]


class DeploymentRunner:
    """Rows through a running deployment. A row the deployment sheds (busy: RESOURCE_EXHAUSTED; no replica
    up: UNAVAILABLE) is sent again after the Retry-After it gave, for up to RETRY_FOR seconds."""
    RETRY_FOR = 600.0

    def __init__(self, client, options: Options, concurrency: int):
        self.client, self.options, self.concurrency = client, options, concurrency

    def groups(self, rows: list[Row]) -> list[list[Row]]:
        return [[r] for r in rows]

    def _call(self, row: Row):
        end = time.monotonic() + self.RETRY_FOR
        while True:
            try:
                return self._once(row)
            except FastSDError as e:
                wait_s = getattr(e, "retry_after", None)
                if getattr(e, "code", None) not in ("RESOURCE_EXHAUSTED", "UNAVAILABLE") or not wait_s \
                        or time.monotonic() + wait_s > end:
                    raise
                time.sleep(wait_s)

    def _once(self, row: Row):
        o = self.options
        if row.depth_map is not None:
            raise InvalidParameter("depth_map", row.depth_map, "nothing with a deployment (MII carries images and "
                                   "masks only): its depth model estimates the map itself; run the batch locally "
                                   "(--model) to give maps")
        image, mask = row.encoded_images()
        reply = self.client.generate([row.prompt], [o.row_negative(row)], num_inference_steps=o.steps,
                                     guidance_scale=o.guidance, height=o.height, width=o.width,
                                     seed=o.row_seed(row), scheduler=o.scheduler, eta=o.eta or None,
                                     image=None if image is None else [image],
                                     mask_image=None if mask is None else [mask], strength=row.strength,
                                     lora=row.lora, noise_level=row.noise_level)
        return [(reply.images[0], reply.nsfw_content_detected[0])]

    def run(self, groups: Iterable[list[Row]]) -> Iterator[tuple[list[Row], list]]:
        todo = iter(groups)
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="batch-client") as pool:
            running = {}

            def top_up():
                while len(running) < self.concurrency:
                    group = next(todo, None)
                    if group is None:
                        return
                    running[pool.submit(self._call, group[0])] = group
            top_up()
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    group = running.pop(fut)
                    try:
                        yield group, fut.result()
                    except FastSDError as e:
                        yield group, [f"{e.code}: {plain_message(e)}" if isinstance(e, DeploymentError) else str(e)]
                top_up()
