"""`kvblend serve` on the real SmolLM2-135M-Instruct (fp32, CPU): the openai client gets, over HTTP, the
answer Engine.answer gives in-process, and the second request reuses the stored chunks."""

from __future__ import annotations

import openai
import pytest

from kvblend.config import EngineConfig
from kvblend.engine import Engine
from kvblend.generation.sampling import SamplingParams
from kvblend.model.registry import NAMED_MODELS, converted_folder, load_model
from kvblend.serve.process import ServerProcess

DOCS = ["Marie Curie was a physicist and chemist who conducted pioneering research on radioactivity.",
        "The Louvre in Paris is the world's most-visited art museum."]
SYSTEM = "Answer the question from the passages in a few words."
QUESTION = "Which museum is the most visited?"


@pytest.fixture(scope="module")
def folder():
    return converted_folder(NAMED_MODELS["smollm2-135m-instruct"])


def test_real_model_over_http_equals_engine_answer(folder, tmp_path):
    with ServerProcess(["--model", str(folder), "--dtype", "float32", "--device", "cpu"], tmp_path / "server.log",
                       env={"KVBLEND_HOME": str(tmp_path / "home")}, startup_timeout_s=300) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        name = client.models.list().data[0].id
        replies = [client.chat.completions.create(
            model=name, messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
            max_tokens=8, temperature=0, extra_body={"documents": DOCS}) for _ in range(2)]
    engine = Engine(EngineConfig(home=str(tmp_path / "engine-home")),
                    model=load_model(str(folder), dtype="float32", device="cpu"))
    texts = [f"{d}\n\n" for d in DOCS]
    want = engine.answer(engine.prompt(SYSTEM, texts, QUESTION), texts, mode="blend", ratio=0.15,
                         sampling=SamplingParams(max_new_tokens=8, temperature=0.0, stop_on_newline=False))
    assert want.text.strip(), "the real model answers something"
    for r in replies:
        assert r.model_extra["kvblend"]["completion_token_ids"] == want.token_ids
        assert r.choices[0].message.content == want.text
    first, second = (r.usage.model_extra["kvblend"] for r in replies)
    assert first["chunk_misses"] == 2 and second["chunk_misses"] == 0 and second["chunk_hits"]["gpu"] == 2
