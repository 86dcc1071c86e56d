#!/usr/bin/env python
"""Schema-driven fuzzing of the HTTP service: no request may get a 5xx answer.

schemathesis reads the app's own OpenAPI schema and generates requests for every operation, valid
(positive) and invalid (negative) by the schema, each media type of each body (multipart forms, raw
image/jpeg and image/png bytes); they run in-process against the ASGI app (no socket, nothing leaves
the machine). Bounded: --examples per operation and mode. Exits 1 on any 5xx.

Not part of the pytest suite: a few hundred requests through detection take tens of seconds, and
generated inputs vary between schemathesis releases; the suite's own refusal tests are deterministic.

    python bench/serve_fuzz.py [--model_path seed5] [--examples 150] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict

import hypothesis
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode

from race_classifier.inference.classifier import Classifier
from race_classifier.serving.app import create_app
from race_classifier.serving.limits import Limits
from race_classifier.utils import add_hidden_aliases


def fuzz_operation(op, mode: GenerationMode, examples: int, seed: int):
    """({body media type: status counts}, 5xx failures) of ``examples`` generated calls of one operation;
    schemathesis picks among the operation's body media types itself."""
    counts, failures = defaultdict(Counter), []

    @hypothesis.settings(max_examples=examples, deadline=None, database=None,
                         suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @hypothesis.seed(seed)
    @hypothesis.given(case=op.as_strategy(generation_mode=mode))
    def run(case):
        response = case.call()
        counts[case.media_type or "-"][response.status_code] += 1
        if response.status_code >= 500:
            failures.append(f"{case.method} {case.path} {case.media_type}: {response.status_code} "
                            f"{response.text[:200]}")

    run()
    return counts, failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default="seed5", help="a bundled model name or a model file (default seed5)")
    p.add_argument("--examples", type=int, default=150, help="generated requests per operation and mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    add_hidden_aliases(p)
    args = p.parse_args(argv)

    app = create_app(Classifier.load(args.model_path), Limits(max_bytes=1024 * 1024, max_pixels=4_000_000))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    rows, failures, start = [], [], time.perf_counter()
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                counts, failed = fuzz_operation(op, mode, args.examples, args.seed)
            except hypothesis.errors.Unsatisfiable:  # e.g. no invalid form of a parameterless GET
                continue
            failures += failed
            for media_type, statuses in sorted(counts.items()):
                rows.append({"operation": f"{op.method.upper()} {op.path}", "mode": mode.value, "body": media_type,
                             "requests": sum(statuses.values()), "statuses": dict(sorted(statuses.items()))})
    seconds = time.perf_counter() - start

    print(f"{'operation':<26} {'mode':<9} {'body':<20} {'requests':>8}  statuses")
    for r in rows:
        statuses = " ".join(f"{k}:{v}" for k, v in r["statuses"].items())
        print(f"{r['operation']:<26} {r['mode']:<9} {r['body']:<20} {r['requests']:>8}  {statuses}")
    total = sum(r["requests"] for r in rows)
    print(f"{total} requests in {seconds:.1f} s, {len(failures)} server errors (5xx)")
    for f in failures[:20]:
        print("  " + f)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "requests": total, "seconds": seconds, "server_errors": failures}, f, indent=2)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
