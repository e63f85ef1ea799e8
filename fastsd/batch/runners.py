"""Where a batch's rows are drawn: the local engine (rows batched into one engine call each), or a running
deployment (one request per row, many in flight, so the deployment's dynamic batching fills its batches).

Both yield `(rows, results)` as work finishes, each result an `(image, nsfw)` pair or the error text."""
from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Iterable, Iterator

from ..errors import FastSDError
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

    def row_seed(self, row: Row) -> int:
        return row.seed if row.seed is not None else self.seed + row.number

    def row_negative(self, row: Row) -> str:
        return row.negative_prompt if row.negative_prompt is not None else (self.negative or "")


def chunks(rows: list[Row], size: int) -> list[list[Row]]:
    """Fixed groups of `size` over the runnable rows in input order. The same input always gives the same
    groups, so a resumed batch puts each row in the engine call it had in an uninterrupted run (batched
    GEMMs round differently per batch composition; fixed groups keep images bit-identical)."""
    return [rows[i:i + size] for i in range(0, len(rows), size)]


class LocalRunner:
    def __init__(self, engine, options: Options, batch_size: int):
        self.engine, self.options, self.batch_size = engine, options, batch_size

    def groups(self, rows: list[Row]) -> list[list[Row]]:
        return chunks(rows, self.batch_size)

    def _call(self, rows: list[Row]):
        o = self.options
        result = self.engine.generate([r.prompt for r in rows], [o.row_negative(r) for r in rows],
                                      num_images_per_prompt=1, num_inference_steps=o.steps, guidance_scale=o.guidance,
                                      height=o.height, width=o.width, seed=[o.row_seed(r) for r in rows],
                                      scheduler=o.scheduler, progress=False)
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
    def __init__(self, client, options: Options, concurrency: int):
        self.client, self.options, self.concurrency = client, options, concurrency

    def groups(self, rows: list[Row]) -> list[list[Row]]:
        return [[r] for r in rows]

    def _call(self, row: Row):
        o = self.options
        reply = self.client.generate([row.prompt], [o.row_negative(row)], num_inference_steps=o.steps,
                                     guidance_scale=o.guidance, height=o.height, width=o.width,
                                     seed=o.row_seed(row), scheduler=o.scheduler)
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
                        yield group, [f"{getattr(e, 'code', 'ERROR')}: {e}" if getattr(e, "code", None) else str(e)]
                top_up()
