"""NVTX ranges (nesting, the phases a training step shows) and the capture window's argument check."""

import pytest

from tests.distributed_workers import trainer
from vdistill.methods.train import profiling
from vdistill.methods.train.profiling import CaptureWindow, nvtx_range


class RecordingDomain:
    """Stands in for the nvtx "vdistill" domain: records pushes (by message) and pops."""

    def __init__(self):
        self.events: list[tuple[str, str | None]] = []
        self.depth = 0

    def get_event_attributes(self, message: str, color: str):
        return message

    def push_range(self, message: str) -> None:
        self.events.append(("push", message))
        self.depth += 1

    def pop_range(self) -> None:
        self.events.append(("pop", None))
        self.depth -= 1


@pytest.fixture
def domain(monkeypatch):
    recorder = RecordingDomain()
    monkeypatch.setattr(profiling, "DOMAIN", recorder)
    profiling._attributes.cache_clear()
    yield recorder
    profiling._attributes.cache_clear()


def test_ranges_nest_and_pop_on_errors(domain):
    with pytest.raises(RuntimeError), nvtx_range("step 0"), nvtx_range("data"):
        raise RuntimeError("boom")
    assert domain.events == [("push", "step 0"), ("push", "data"), ("pop", None), ("pop", None)]


def test_an_rcm_step_shows_every_phase(domain, tmp_path):
    trainer("rcm", tmp_path, steps=2).fit()  # DMD from step 1: simulation, DMD and critic phases too
    pushed = [name for kind, name in domain.events if kind == "push"]
    assert domain.depth == 0
    assert pushed[0] == "step 0" and "step 1" in pushed
    step1 = pushed[pushed.index("step 1"):]
    for phase in ("data", "student_forward", "teacher", "jvp", "simulate", "student", "dmd", "student_backward",
                  "optimizer", "ema", "auxiliary", "critic"):
        assert phase in step1, phase
    assert step1.index("teacher") < step1.index("jvp") < step1.index("student_backward")


def test_real_nvtx_domain_takes_the_ranges():
    nvtx = pytest.importorskip("nvtx")
    assert profiling.DOMAIN is nvtx.get_domain("vdistill")
    with nvtx_range("step 0"), nvtx_range("an unknown phase"):
        pass


def test_capture_window_checks_its_steps():
    with pytest.raises(ValueError, match="profile window"):
        CaptureWindow((3, 3))
