"""`clean()`'s order and idempotence against an in-memory fake of the engine (no Docker needed).

The fake models what the engine enforces and clean() must respect: a running service
recreates its task containers; a network with attached containers refuses removal; an
image with child images refuses removal (409) even when forced. Real-engine behaviour
is covered by tests/system/test_clean.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import docker.errors
import pytest

from emulator.runtime.cleanup import LABEL_IMAGE, LABEL_RUN, CleanError, clean


@dataclass
class FakeResponse:
    status_code: int
    reason: str = "Forbidden"
    url: str = "http+docker://localhost/v1.41/networks/n1"


def api_error(status: int, message: str) -> docker.errors.APIError:
    return docker.errors.APIError(message, response=FakeResponse(status), explanation=message)  # type: ignore[arg-type]


def label_matches(labels: dict[str, str], flt: str) -> bool:
    key, sep, value = flt.partition("=")
    return key in labels and (not sep or labels[key] == value)


@dataclass
class Obj:
    engine: FakeEngine
    kind: str
    name: str
    labels: dict[str, str]
    parent: str | None = None  # images: the image this one was built on
    tags: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.name

    @property
    def short_id(self) -> str:
        return self.name[:10]

    def remove(self, **_: Any) -> None:
        self.engine.remove(self.kind, self.name)


class Collection:
    def __init__(self, engine: FakeEngine, kind: str) -> None:
        self.engine, self.kind = engine, kind

    def list(self, all: bool = False, filters: dict[str, Any] | None = None) -> list[Obj]:  # noqa: A002
        label = (filters or {}).get("label")
        return [o for o in self.engine.objects[self.kind].values() if label is None or label_matches(o.labels, label)]

    def remove(self, image_id: str, force: bool = False) -> None:
        self.engine.remove(self.kind, image_id)


class FakeEngine:
    """Just enough of docker.DockerClient for clean()."""

    def __init__(self, *, swarm_manager: bool = False) -> None:
        self.swarm_manager = swarm_manager
        self.objects: dict[str, dict[str, Obj]] = {k: {} for k in ("services", "containers", "networks", "volumes", "images")}
        self.removed: list[tuple[str, str]] = []
        self.containers = Collection(self, "containers")
        self.networks = Collection(self, "networks")
        self.volumes = Collection(self, "volumes")
        self.images = Collection(self, "images")
        self.services = Collection(self, "services")

    def info(self) -> dict[str, Any]:
        state = "active" if self.swarm_manager else "inactive"
        return {"Swarm": {"LocalNodeState": state, "ControlAvailable": self.swarm_manager}}

    def add(self, kind: str, name: str, labels: dict[str, str], parent: str | None = None) -> None:
        self.objects[kind][name] = Obj(self, kind, name, labels, parent, [f"{name}:latest"])

    def remove(self, kind: str, name: str) -> None:
        if name not in self.objects[kind]:
            raise docker.errors.ImageNotFound("gone") if kind == "images" else docker.errors.NotFound("gone")
        if kind == "networks" and self.objects["containers"]:
            raise api_error(403, f"error while removing network: network {name} has active endpoints")
        if kind == "images" and any(i.parent == name for i in self.objects["images"].values()):
            raise api_error(409, f"conflict: unable to delete {name} (cannot be forced) - image has dependent child images")
        del self.objects[kind][name]
        self.removed.append((kind, name))

    def close(self) -> None:
        pass


RUN = {LABEL_RUN: "r1"}


def populated(*, swarm_manager: bool = False) -> FakeEngine:
    engine = FakeEngine(swarm_manager=swarm_manager)
    engine.add("containers", "c1", RUN)
    engine.add("containers", "c-other", {LABEL_RUN: "r2"})
    engine.add("containers", "unlabelled", {})
    engine.add("networks", "n1", RUN)
    engine.add("volumes", "v1", RUN)
    engine.add("images", "base", {LABEL_IMAGE: "1"})
    engine.add("images", "qnetem", {LABEL_IMAGE: "1"}, parent="base")
    engine.add("images", "python", {})
    return engine


def test_clean_one_run_leaves_the_rest() -> None:
    engine = populated()
    engine.objects["containers"].pop("c-other")
    engine.objects["containers"].pop("unlabelled")
    report = clean(run_id="r1", client=engine)
    assert (report.containers, report.networks, report.volumes, report.images) == (("c1",), ("n1",), ("v1",), ())
    assert [kind for kind, _ in engine.removed] == ["containers", "networks", "volumes"]
    assert set(engine.objects["images"]) == {"base", "qnetem", "python"}


def test_clean_is_idempotent() -> None:
    engine = populated()
    engine.objects["containers"].pop("unlabelled")  # else the fake's networks never empty
    first = clean(client=engine)
    assert first.counts() == {"services": 0, "containers": 2, "networks": 1, "volumes": 1, "images": 0}
    second = clean(client=engine)
    assert second.total == 0


def test_images_children_first_and_only_labelled() -> None:
    engine = populated()
    for name in ("c1", "c-other", "unlabelled"):
        engine.objects["containers"].pop(name)
    report = clean(images=True, client=engine)
    assert report.images == ("qnetem:latest", "base:latest")  # base refused (409) until its child was gone
    assert set(engine.objects["images"]) == {"python"}


def test_services_go_first_on_a_swarm_manager() -> None:
    engine = populated(swarm_manager=True)
    engine.add("services", "s1", RUN)
    engine.objects["containers"].pop("unlabelled")
    report = clean(client=engine)
    assert report.services == ("s1",)
    assert engine.removed[0] == ("services", "s1")


def test_services_untouched_when_not_a_manager() -> None:
    engine = populated(swarm_manager=False)
    engine.add("services", "s1", RUN)
    engine.objects["containers"].pop("unlabelled")
    assert clean(client=engine).services == ()


def test_a_refusal_is_one_line_clean_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A network that keeps an endpoint past the retry window: CleanError naming it."""
    monkeypatch.setattr("emulator.runtime.cleanup._NETWORK_RETRY_S", 0.0)
    engine = populated()  # the unlabelled container stays attached (in the fake, to every network)
    with pytest.raises(CleanError, match=r"cannot remove network n1: .*active endpoints") as excinfo:
        clean(run_id="r1", client=engine)
    assert "\n" not in str(excinfo.value)
