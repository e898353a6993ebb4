"""Append the rows a device call brought back (its $OUT/bench.json, written by bench.py --json) to
results/bench.json, each once, keeping the file's other fields; written to a temporary name, then renamed.
    python results/calls/merge.py /path/to/files_at/bench.json [...]"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
path = os.path.join(ROOT, "results", "bench.json")
d = json.load(open(path))
seen = {json.dumps(r, sort_keys=True) for r in d["rows"]}
for f in sys.argv[1:]:
    new = [r for r in json.load(open(f))["rows"] if json.dumps(r, sort_keys=True) not in seen]
    missing = [r.get("contender") for r in new if not r.get("device_call")]
    if missing:
        sys.exit(f"{f}: rows without a device_call ({missing}); run bench.py with --device_call ID")
    d["rows"] += new
    seen |= {json.dumps(r, sort_keys=True) for r in new}
    print(f"{f}: {len(new)} rows added ({sorted({r['device_call'] for r in new})})")
with open(path + ".tmp", "w") as out:
    out.write(json.dumps(d, indent=2))
os.replace(path + ".tmp", path)
