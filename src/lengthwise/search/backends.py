"""Where fitness evaluations run: in this process, or spread over Ray workers (one model copy per worker).

A backend is a callable `(candidates) -> fitness values` in the same order. The Ray backend ships a picklable
*factory* to each worker actor, which builds its own fitness function (loads its own model copy) once; every
evaluation is then deterministic, so results equal the serial run's.
"""

from __future__ import annotations

from collections.abc import Callable

from lengthwise.distributed import ray_available, require_ray, start_ray
from lengthwise.search.space import Candidate
from lengthwise.errors import UserError

__all__ = ["RayBackend", "SerialBackend", "ray_available"]

Fitness = Callable[[Candidate], float]


class SerialBackend:
    name = "serial"

    def __init__(self, fitness: Fitness, on_result: Callable[[], None] | None = None) -> None:
        self.fitness = fitness
        self.on_result = on_result

    def __call__(self, candidates: list[Candidate]) -> list[float]:
        out = []
        for c in candidates:
            out.append(float(self.fitness(c)))
            if self.on_result:
                self.on_result()
        return out

    def close(self) -> None:
        pass


class RayBackend:
    """`workers` actors, each holding the fitness built by `factory()`; candidates are dealt round robin.

    `address`: a Ray cluster address (`ray://host:10001`, `auto`) or "local" to start a local instance.
    """

    name = "ray"

    def __init__(
        self,
        factory: Callable[[], Fitness],
        workers: int = 2,
        address: str = "local",
        num_cpus_per_worker: float = 1.0,
        on_result: Callable[[], None] | None = None,
    ) -> None:
        if workers < 1:
            raise UserError(f"workers must be >= 1, got {workers}")
        self.ray = ray = require_ray("--ray-address")
        self._started = start_ray(address, max(workers, 1) * num_cpus_per_worker, "--ray-address")

        @ray.remote(num_cpus=num_cpus_per_worker)
        class _Worker:
            def __init__(self, make):
                self.fitness = make()

            def evaluate(self, candidate):
                return float(self.fitness(candidate))

        self.actors = [_Worker.remote(factory) for _ in range(workers)]
        self.on_result = on_result

    def __call__(self, candidates: list[Candidate]) -> list[float]:
        refs = [self.actors[i % len(self.actors)].evaluate.remote(c) for i, c in enumerate(candidates)]
        results: dict = {}
        pending = list(refs)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            for ref in done:
                results[ref] = self.ray.get(ref)
                if self.on_result:
                    self.on_result()
        return [results[ref] for ref in refs]

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self._started:
            self.ray.shutdown()
