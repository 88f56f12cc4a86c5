"""`ballast.chains` run in this process: contracts, one flat error, deadlines, safe retries, fan-out, streams."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import traceback
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from ballast.chains import (
    ChainDefinitionError,
    ChainError,
    Chainlet,
    ChainletConfig,
    LocalChain,
    depends,
    entrypoint,
    run_chain,
)
from tests.conftest import REPO


class Doc(BaseModel):
    text: str
    lang: str = "en"


class Upper(Chainlet):
    config = ChainletConfig(idempotent=True)

    async def run(self, doc: Doc) -> str:
        return doc.text.upper()


class Count(Chainlet):
    def run(self, text: str) -> int:  # a sync step runs in a thread
        return len(text)


class Summary(BaseModel):
    upper: str
    length: int


@entrypoint
class Summarize(Chainlet):
    def __init__(self, upper=depends(Upper), count=depends(Count)):
        self.upper = upper
        self.count = count

    async def run(self, doc: Doc) -> Summary:
        up, n = await asyncio.gather(self.upper.run(doc), self.count.run(doc.text))
        return Summary(upper=up, length=n)


def go(entry: type[Chainlet], inputs: dict, **kw: object) -> object:
    return asyncio.run(run_chain(entry, inputs, **kw))  # type: ignore[arg-type]


def test_a_chain_runs_with_validated_inputs_and_outputs() -> None:
    assert go(Summarize, {"doc": {"text": "abc"}}) == Summary(upper="ABC", length=3)


def test_a_bad_input_names_the_step_and_field() -> None:
    with pytest.raises(ChainError) as e:
        go(Summarize, {"doc": {"text": 5}}, request_id="req-1")
    assert (e.value.step, e.value.kind, e.value.request_id) == ("Summarize", "contract", "req-1")
    assert "doc.text" in str(e.value)


class Liar(Chainlet):
    async def run(self, n: int) -> int:
        return "not a number"  # type: ignore[return-value]


@entrypoint
class AsksLiar(Chainlet):
    def __init__(self, liar=depends(Liar)):
        self.liar = liar

    async def run(self, n: int) -> int:
        return await self.liar.run(n)


def test_a_bad_output_names_the_step_that_returned_it() -> None:
    with pytest.raises(ChainError) as e:
        go(AsksLiar, {"n": 1})
    assert (e.value.step, e.value.kind) == ("Liar", "contract")
    assert "output" in e.value.message


class Broken(Chainlet):
    async def run(self, x: int) -> int:
        raise ValueError(f"cannot handle {x}")


class Middle(Chainlet):
    def __init__(self, broken=depends(Broken)):
        self.broken = broken

    async def run(self, x: int) -> int:
        return await self.broken.run(x) + 1


@entrypoint
class Top(Chainlet):
    def __init__(self, middle=depends(Middle)):
        self.middle = middle

    async def run(self, x: int) -> int:
        return await self.middle.run(x)


def test_an_error_deep_in_the_chain_reaches_the_caller_as_one_error() -> None:
    with pytest.raises(ChainError) as e:
        go(Top, {"x": 7}, request_id="abc123")
    err = e.value
    assert (err.step, err.request_id, err.kind) == ("Broken", "abc123", "error")
    assert err.message == "ValueError: cannot handle 7"
    assert str(err) == "step Broken failed (request abc123): ValueError: cannot handle 7"
    assert err.__cause__ is None and err.__suppress_context__
    shown = "".join(traceback.format_exception(err))
    assert "During handling" not in shown and "direct cause" not in shown


class Stuck(Chainlet):
    async def run(self, x: int) -> int:
        await asyncio.Event().wait()
        return x


@entrypoint
class CallsStuck(Chainlet):
    def __init__(self, stuck=depends(Stuck)):
        self.stuck = stuck

    async def run(self, x: int) -> int:
        return await self.stuck.run(x)


def test_the_callers_deadline_names_the_step_that_ran_out_of_time() -> None:
    with pytest.raises(ChainError) as e:
        go(CallsStuck, {"x": 1}, deadline_s=0.05)
    assert (e.value.step, e.value.kind) == ("Stuck", "deadline")
    assert "deadline" in e.value.message


@entrypoint
class StuckWithTimeout(Chainlet):
    def __init__(self, stuck=depends(Stuck, timeout_s=0.05)):
        self.stuck = stuck

    async def run(self, x: int) -> int:
        return await self.stuck.run(x)


def test_a_dependency_timeout_bounds_each_call() -> None:
    with pytest.raises(ChainError) as e:
        go(StuckWithTimeout, {"x": 1})
    assert (e.value.step, e.value.kind) == ("Stuck", "deadline")
    assert "its timeout" in e.value.message


class SeesDeadline(Chainlet):
    async def run(self, x: int) -> float:
        from ballast.chains.context import remaining_s
        left = remaining_s()
        assert left is not None
        return left


@entrypoint
class PassesDeadline(Chainlet):
    def __init__(self, inner=depends(SeesDeadline)):
        self.inner = inner

    async def run(self, x: int) -> float:
        return await self.inner.run(x)


def test_the_deadline_travels_with_each_hop() -> None:
    left = go(PassesDeadline, {"x": 1}, deadline_s=60)
    assert 0 < left <= 60  # type: ignore[operator]


class Flaky(Chainlet):
    config = ChainletConfig(idempotent=True)
    calls = 0

    async def run(self, x: int) -> int:
        type(self).calls += 1
        if type(self).calls < 3:
            raise ConnectionError("try again")
        return x * 2


@entrypoint
class RetriesFlaky(Chainlet):
    def __init__(self, flaky=depends(Flaky, retries=2)):
        self.flaky = flaky

    async def run(self, x: int) -> int:
        return await self.flaky.run(x)


def test_an_idempotent_step_is_retried() -> None:
    Flaky.calls = 0
    assert go(RetriesFlaky, {"x": 4}) == 8
    assert Flaky.calls == 3


@entrypoint
class RetriesFlakyOnce(Chainlet):
    def __init__(self, flaky=depends(Flaky, retries=1)):
        self.flaky = flaky

    async def run(self, x: int) -> int:
        return await self.flaky.run(x)


def test_retries_give_up_with_the_steps_last_error() -> None:
    Flaky.calls = 0
    with pytest.raises(ChainError) as e:
        go(RetriesFlakyOnce, {"x": 4})
    assert (e.value.step, e.value.message) == ("Flaky", "ConnectionError: try again")
    assert Flaky.calls == 2


@entrypoint
class RetriesBroken(Chainlet):
    def __init__(self, broken=depends(Broken, retries=3)):
        self.broken = broken

    async def run(self, x: int) -> int:
        return await self.broken.run(x)


def test_retrying_a_step_that_is_not_idempotent_is_refused_before_any_call() -> None:
    with pytest.raises(ChainDefinitionError, match="Broken, which is not idempotent"):
        LocalChain(RetriesBroken)


class Tokens(Chainlet):
    config = ChainletConfig(idempotent=True)
    starts = 0
    fail_after_first = False

    async def run(self, n: int) -> AsyncIterator[str]:
        type(self).starts += 1
        if type(self).starts == 1 and not type(self).fail_after_first:
            raise ConnectionError("not yet")
        for i in range(n):
            if i == 1 and type(self).fail_after_first:
                raise RuntimeError("lost it")
            yield f"t{i}"


@entrypoint
class Streams(Chainlet):
    def __init__(self, tokens=depends(Tokens, retries=2)):
        self.tokens = tokens

    async def run(self, n: int) -> AsyncIterator[str]:
        async for t in self.tokens.run(n):
            yield t.upper()


def test_a_stream_is_retried_only_before_its_first_item() -> None:
    Tokens.starts, Tokens.fail_after_first = 0, False
    assert go(Streams, {"n": 3}) == ["T0", "T1", "T2"]
    assert Tokens.starts == 2
    Tokens.starts, Tokens.fail_after_first = 0, True
    with pytest.raises(ChainError) as e:
        go(Streams, {"n": 3})
    assert (e.value.step, e.value.message, Tokens.starts) == ("Tokens", "RuntimeError: lost it", 1)


class Square(Chainlet):
    running = 0
    peak = 0

    async def run(self, x: int) -> int:
        cls = type(self)
        cls.running += 1
        cls.peak = max(cls.peak, cls.running)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        cls.running -= 1
        if x < 0:
            raise ValueError("negative")
        return x * x


@entrypoint
class FanOut(Chainlet):
    def __init__(self, square=depends(Square)):
        self.square = square

    async def run(self, xs: list[int]) -> list[int]:
        return await self.square.map(xs, concurrency=3)


def test_map_keeps_order_and_bounds_concurrency() -> None:
    Square.peak = 0
    assert go(FanOut, {"xs": list(range(20))}) == [x * x for x in range(20)]
    assert Square.peak == 3


def test_map_fails_with_one_error() -> None:
    with pytest.raises(ChainError) as e:
        go(FanOut, {"xs": [1, 2, -3, 4]})
    assert (e.value.step, e.value.message) == ("Square", "ValueError: negative")


def test_definition_errors_are_found_before_any_call() -> None:
    class NoHints(Chainlet):
        async def run(self, x):  # type: ignore[no-untyped-def]
            return x

    with pytest.raises(ChainDefinitionError, match="'x' needs a type annotation"):
        LocalChain(NoHints)


PIPELINE = REPO / "examples" / "chains" / "pipeline.py"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ballast.cli.main", "chains", "run", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_the_cli_runs_a_chain_file() -> None:
    r = _cli(str(PIPELINE), "--input", json.dumps({"text": "banana apple kiwi"}))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"values": [4.0, 1.0, 2.0, 0.0, 0.0]}


def test_the_cli_prints_one_line_for_a_chain_error() -> None:
    r = _cli(str(PIPELINE), "--input", '{"text": 3}', "--request-id", "r-9")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "error: step Pipeline broke its contract (request r-9): input field 'text': Input should be a valid string"]


STREAMING_FILE = '''
import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from ballast.chains import Chainlet


class Count(Chainlet):
    entry = True

    async def run(self, n: int, stall: bool = False) -> AsyncIterator[int]:
        for i in range(n):
            yield i
        if stall:
            await asyncio.Event().wait()
'''


def test_the_cli_streams_json_lines_and_keeps_the_deadline(tmp_path: Path) -> None:
    f = tmp_path / "count.py"
    f.write_text(STREAMING_FILE)
    r = _cli(str(f), "--input", '{"n": 3}')
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["0", "1", "2"]
    r = _cli(str(f), "--input", '{"n": 2, "stall": true}', "--deadline", "0.2", "--request-id", "r-s")
    assert r.returncode == 1 and r.stdout.splitlines() == ["0", "1"]
    assert r.stderr.startswith("error: step Count ran out of time (request r-s): exceeded the caller's deadline")


def test_a_file_needs_exactly_one_entry_step(tmp_path: Path) -> None:
    none = tmp_path / "none.py"
    none.write_text(STREAMING_FILE.replace("    entry = True\n", ""))
    r = _cli(str(none))
    assert r.returncode == 1 and "mark exactly one step with @entrypoint (found none)" in r.stderr
    two = tmp_path / "two.py"
    two.write_text(STREAMING_FILE + "\n\nclass Again(Count):\n    pass\n")
    r = _cli(str(two))
    assert r.returncode == 1 and "(found Count, Again)" in r.stderr
