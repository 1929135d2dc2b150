"""Tokens/s of `rwkvray prepare-data` on 1 and on 2 CPUs (a local Ray instance of that size), on a generated jsonl
corpus: text rows and chat rows, English and Chinese words.

For each CPU count: Ray starts with that many CPUs, one untimed run warms the workers (process start, vocab
load), then one timed run of prepare_data (list, tokenize on Ray Data, write .bin and .idx). A one-process
figure (the same tokenize function over the whole corpus, no Ray) is printed for comparison. The machine's
load average is printed before and after, since other work on the machine changes every figure.

    python benchmarks/prepare_data_bench.py --mb 32 --cpus 1,2 [--json out.json]
"""
import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORDS = ("the state of a model is tuned on the data of one task while every weight stays frozen and the "
         "recurrence carries it forward token by token 状态 调优 模型 数据 训练 文本").split()


def write_corpus(folder: str, megabytes: float, files: int = 4) -> list[str]:
    rng = random.Random(0)
    paths = [os.path.join(folder, f"part-{i}.jsonl") for i in range(files)]
    per_file = megabytes * 2**20 / files
    for path in paths:
        with open(path, "w", encoding="utf-8") as f:
            while f.tell() < per_file:
                words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 400)))
                row = ({"text": words} if rng.random() < 0.7 else
                       {"messages": [{"role": "user", "content": words[:80]}, {"role": "assistant", "content": words}]})
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return paths


def one_process(paths: list[str]) -> tuple[int, float]:
    from rwkvray.text.tokenizer import get_tokenizer
    from rwkvray.train.jsonl_tokens import tokenize_lines
    tokenizer = get_tokenizer()
    started, tokens = time.perf_counter(), 0
    for path in paths:
        with open(path, "rb") as f:
            tokens += len(tokenize_lines(f.read(), path, tokenizer).tokens)
    return tokens, time.perf_counter() - started


def on_ray(paths: list[str], cpus: int, out: str) -> tuple[int, float]:
    import ray
    from rwkvray.launch.prepare_data import prepare_data
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        prepare_data(paths, out, overwrite=True)  # warm-up: worker processes, the vocab in each
        started = time.perf_counter()
        prepare_data(paths, out, overwrite=True)
        seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
    return os.path.getsize(out + ".bin") // 2, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=32, help="corpus size in MiB")
    parser.add_argument("--cpus", default="1,2", help="comma-separated CPU counts")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths = write_corpus(folder, args.mb)
        load_before = os.getloadavg()
        tokens, seconds = one_process(paths)
        rows.append({"mode": "one process, no Ray", "cpus": 1, "tokens": tokens, "seconds": seconds})
        for cpus in map(int, args.cpus.split(",")):
            tokens, seconds = on_ray(paths, cpus, os.path.join(folder, "out"))
            rows.append({"mode": "prepare-data on Ray Data", "cpus": cpus, "tokens": tokens, "seconds": seconds})
        load_after = os.getloadavg()
    print(f"corpus {args.mb:g} MiB; load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
          f"({os.cpu_count()} cores)")
    for row in rows:
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
        print(f"{row['mode']:26} {row['cpus']} CPU  {row['tokens']:>10,} tokens  {row['seconds']:6.2f} s  "
              f"{row['tokens_per_s']:>12,.0f} tokens/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"corpus_mib": args.mb, "load_before": load_before, "load_after": load_after, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
