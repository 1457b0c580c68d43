"""A pod of `podkit up` as its hooks' control loops see it (`podkit.contract.LocalPod`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from podkit.system.runtime import Runtime
    from podkit.system.spec import Pod


class LocalPodView:
    """A pod as its hooks' control loops see it (`podkit.contract.LocalPod`)."""

    def __init__(self, runtime: Runtime, pod: Pod) -> None:
        self._runtime = runtime
        self._pod = pod
        self.name = pod.name
        self.clock = runtime.clock

    @property
    def stopping(self) -> bool:
        return self._runtime.stopping

    def backend_url(self, name: str) -> str:
        return self._runtime.backends[name]

    def replicas(self) -> int:
        return sum(1 for r in self._runtime.replicas if r.pod is self._pod)

    async def scale(self, count: int) -> None:
        await self._runtime.scale(self._pod, count)

    def event(self, text: str) -> None:
        self._runtime.log.event(text)
