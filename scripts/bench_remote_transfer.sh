#!/usr/bin/env bash
# Query-based LabelFool (transfer prior) against EfficientNet-Lite2 behind MLServer, surrogate
# EfficientNet-Lite0, on a folder of images: success within each query count, queries to success,
# perceptibility. Needs a LabelFool server with the remote configured (see README, Remote targets).
#   scripts/bench_remote_transfer.sh URL REMOTE IMAGES_DIR OUT.json [BUDGET]
set -euo pipefail
url=$1 remote=$2 images=$3 out=$4 budget=${5:-9}
tmp=$(mktemp -d)
for f in "$images"/*; do
  curl -s -F image=@"$f" "$url/attack?model=remote:$remote&budget=$budget&search=false" \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); d.pop("png_base64",None); print(json.dumps({"file": sys.argv[1], **d}))' "$(basename "$f")" \
    >> "$tmp/results.jsonl"
done
python3 - "$tmp/results.jsonl" "$out" "$budget" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
ok = [r for r in rows if "error" not in r]
succ = [r for r in ok if r["success"]]
key = lambda r: "pgd" if r["candidates"][-1].get("margin") is None else str(r["candidates"][-1]["margin"])
order = lambda k: (k == "pgd", float(k) if k != "pgd" else 0.0)
within = {q: sum(1 for r in succ if r["queries"] <= q) for q in range(2, int(sys.argv[3]) + 1)}
summary = {
    "images": len(rows), "errors": len(rows) - len(ok), "budget": int(sys.argv[3]),
    "success": len(succ), "success_rate": len(succ) / max(1, len(ok)),
    "success_within_queries": within,
    "median_queries_to_success": statistics.median([r["queries"] for r in succ]) if succ else None,
    "mean_perceptibility_of_successes": statistics.mean([r["perturbation"]["perceptibility"] for r in succ]) if succ else None,
    # The successful candidate: LabelFool's margin, or "pgd" (the last candidate, no margin).
    "margin_of_successes": {k: sum(1 for r in succ if key(r) == k) for k in sorted({key(r) for r in succ}, key=order)},
    "remote_top1_correct_on_upload": sum(1 for r in ok if r["file"].split("_")[0] == r["original"].get("wnid")),
}
json.dump({"summary": summary, "results": rows}, open(sys.argv[2], "w"), indent=1)
print(json.dumps(summary, indent=1))
PY
