#!/usr/bin/env python3
"""Prints one line per spec of a ginkgo JSON report (critest --ginkgo.json-report):

    spec HANDLER STATE SECONDS :: FULL SPEC TEXT
      why: FIRST LINES OF THE FAILURE (failed specs only)

a "critest HANDLER flaky (passed on attempt N): SPEC" line per spec that failed and then
passed (--ginkgo.flake-attempts), and a closing "critest HANDLER: N passed, N failed,
N skipped in S s of spec time; N flaky" line.

    critest-report.py REPORT.json HANDLER
"""

import json
import sys
from collections import Counter

report, handler = sys.argv[1], sys.argv[2]
with open(report) as f:
    suites = json.load(f)
counts = Counter()
flaky = 0
total = 0.0
for suite in suites:
    for spec in suite.get("SpecReports") or []:
        if spec.get("LeafNodeType") != "It":
            continue
        name = " ".join([*(spec.get("ContainerHierarchyTexts") or []), spec.get("LeafNodeText", "")])
        state = spec.get("State", "unknown")
        secs = spec.get("RunTime", 0) / 1e9
        total += secs
        counts[state] += 1
        print(f"spec {handler} {state} {secs:.1f} :: {name}")
        if state == "passed" and (spec.get("NumAttempts") or 1) > 1:
            flaky += 1
            print(f"critest {handler} flaky (passed on attempt {spec['NumAttempts']}): {name}")
        if state not in ("passed", "skipped", "pending"):
            failure = spec.get("Failure") or {}
            loc = failure.get("Location") or {}
            lines = (failure.get("Message") or "").strip().splitlines()
            msg = " | ".join(lines[:6])
            print(f"  why: {loc.get('FileName', '?').rsplit('/', 1)[-1]}:{loc.get('LineNumber', '?')}: {msg[:600]}")
            # A VM that did not boot: all the shim said (the VMM's status, its log and the
            # guest console's last lines), to find out why.
            if "did not become ready" in msg:
                for line in lines[:200]:
                    print(f"  | {line[:2000]}")
print(
    f"critest {handler}: {counts['passed']} passed, "
    f"{sum(n for s, n in counts.items() if s not in ('passed', 'skipped', 'pending'))} failed, "
    f"{counts['skipped'] + counts['pending']} skipped in {total:.0f} s of spec time; "
    f"{flaky} flaky (failed, then passed when run again)"
)
