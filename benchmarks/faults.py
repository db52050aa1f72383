"""The fault catalogue: how main.py meets ~55 user mistakes and faults.

Every error a user can cause should end in one message, no traceback, a
non-zero exit, naming the file, field or value and what to do, before
anything is written to the workdir. This runs each case and tabulates what
happened, so two checkouts can be compared (docs/pretraining.md, "Long runs", and
the issue notes quote its tables):

    python benchmarks/faults.py --out /tmp/faults/after.md [--repo CHECKOUT] [--only a,b] [--keep]
    python benchmarks/faults.py --out ... --rescore   # rebuild OUT.md/.json from OUT.partial.jsonl + OUT_logs/

About 20 minutes on a 2-core CPU; the disk_full case mounts a 3 MB tmpfs
(root only).

Fixtures are built once, by the first --repo that needs them, and then reused by
every repo (pass --fixtures DIR to build a fresh set with another checkout).

Each case runs `python REPO/main.py ...` in a fresh temporary cwd and records
exit code, meaningful lines, traceback, last error line, seconds and what was
written in the workdir / cwd. Fixtures (a tiny pretraining workdir, a finished
fine-tuning workdir, image folders) are made once under --fixtures and reused.
Run with the project's venv python (sys.executable runs main.py).
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout
DATA_DIR = os.path.abspath(os.path.join(HERE, "..", "shared", "data", "tfds"))
TIMEOUT = 180
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS="--xla_force_host_platform_device_count=2")
ENV.pop("TFDS_DATA_DIR", None)

# ----------------------------------------------------------------- helpers


def tiny(repo, recipe="smoke"):
    """The tiny pretraining flags."""
    return [f"--config={repo}/configs/{recipe}.py", "--config.image_size=16",
            "--config.model.width_multiplier=0.0625", "--config.batch_size=16",
            "--config.num_train_steps=2", "--config.train_split=train[:256]",
            "--config.test_split=test[:128]", "--config.eval_batch_size=64",
            "--config.knn_monitor=False", "--config.write_pictures=False",
            f"--config.data_dir={DATA_DIR}"]


def folder_tiny(repo, dataset):
    """Tiny pretraining on an image folder (folders take whole splits only)."""
    args = [a for a in tiny(repo) if not a.startswith(("--config.train_split", "--config.test_split",
                                                      "--config.data_dir"))]
    return args + [f"--config.dataset={dataset}", "--config.train_split=train", "--config.test_split=test"]


def evalargs(repo, recipe, pretrained, extra=()):
    """A tiny evaluation of `pretrained` on CIFAR-10 slices."""
    args = [f"--config={repo}/configs/{recipe}.py", f"--config.data_dir={DATA_DIR}",
            "--config.train_split=train[:256]", "--config.test_split=test[:128]",
            "--config.eval_batch_size=64"]
    if pretrained is not None:
        args.append(f"--config.pretrained={pretrained}")
    if recipe == "knn":
        args += ["--config.write_pictures=False", "--config.knn.k=10"]
    if recipe == "linear_eval":
        args += ["--config.linear.epochs=1", "--config.linear.batch_size=16"]
    if recipe == "finetune":
        args += ["--config.finetune.epochs=1", "--config.finetune.batch_size=16"]
    return args + list(extra)


def folder_eval(repo, recipe, pretrained, dataset, extra=()):
    args = [a for a in evalargs(repo, recipe, pretrained) if not a.startswith(
        ("--config.train_split", "--config.test_split", "--config.data_dir"))]
    return args + [f"--config.dataset={dataset}", "--config.train_split=train",
                   "--config.test_split=test"] + list(extra)


def snapshot(path):
    """{relpath: (size, mtime_ns)} of every file/dir under path (local only)."""
    out = {}
    if "://" in path or not os.path.exists(path):
        return out
    if os.path.isfile(path):
        st = os.stat(path)
        return {".": (st.st_size, st.st_mtime_ns)}
    for folder, dirs, names in os.walk(path):
        for name in dirs + names:
            full = os.path.join(folder, name)
            try:
                st = os.lstat(full)
            except OSError:
                continue
            rel = os.path.relpath(full, path)
            out[rel] = (st.st_size if not os.path.isdir(full) else -1, st.st_mtime_ns)
    return out


def diff(before, after):
    new = sorted(k for k in after if k not in before)
    changed = sorted(k for k in after if k in before and after[k] != before[k] and after[k][0] != -1)
    gone = sorted(k for k in before if k not in after)
    return new, changed, gone


HEADER = re.compile(r"^[IWEF]\d{4} ")
NOISE = re.compile(r"^(W0000|I0000|E0000|WARNING: All log messages before absl::InitializeLog\(\) is called)")
IGNORED_HEADER = re.compile(r"^[IW]\d{4} ")
BREAK = re.compile(r"^(Traceback|main\.py:|FATAL|Pass --help|During handling|The above exception|"
                   r"([A-Za-z_][\w.]*)?(Error|Exception|Exit|Interrupt)\b)")


def meaningful_lines(text):
    """Lines a user reads as the program's message: drops absl I/W records
    (with their continuation lines, e.g. the config dump) and TF/XLA noise."""
    kept, in_ignored = [], False
    for line in text.splitlines():
        if NOISE.match(line):
            in_ignored = True
            continue
        if IGNORED_HEADER.match(line):
            in_ignored = True
            continue
        if HEADER.match(line):  # E/F absl record: meaningful
            in_ignored = False
            kept.append(line)
            continue
        if in_ignored and not BREAK.match(line):
            continue
        in_ignored = False
        if line.strip():
            kept.append(line)
    return kept


EXC = re.compile(r"^([A-Za-z_][\w.]*)?(Error|Exception|Exit|Interrupt)\b")
BENIGN = re.compile(r"No accelerator found|Given directory is read only|CheckpointManagerOptions\.read_only")
DONE = re.compile(r"(finished at step|Evaluation result|[Ff]inished after)")


def _clip(line, n=200):
    line = line.strip()
    return line if len(line) <= n else line[:60] + " ... " + line[-(n - 65):]


def last_error_line(kept, text):
    lines = text.splitlines()
    if "Traceback (most recent call last)" in text:
        start_at = max(i for i, l in enumerate(lines) if "Traceback (most recent call last)" in l)
        exc = [i for i, l in enumerate(lines) if i > start_at and EXC.match(l)]
        if exc:  # the exception line and its continuation, joined
            tail = [lines[exc[-1]]] + [l for l in lines[exc[-1] + 1:] if l.strip() and not HEADER.match(l)][:3]
            return _clip(" ".join(t.strip() for t in tail))
    for line in reversed(kept):
        if line.strip():
            return _clip(line)
    warnings = [l for l in lines if re.match(r"^W\d{4} ", l) and not NOISE.match(l) and not BENIGN.search(l)]
    if warnings:  # e.g. a run that went on: its last warning says the most
        return _clip("(last warning) " + re.sub(r"^W\d{4} [\d:.]+ +\d+ ", "", warnings[-1]))
    done = [l for l in lines if DONE.search(l) and HEADER.match(l)]
    if done:  # a run that went through: what it says at the end
        return _clip("(log) " + re.sub(r"^[IWEF]\d{4} [\d:.]+ +\d+ ", "", done[-1]))
    lines = [l for l in lines if l.strip()]
    return _clip("(only log lines) " + lines[-1]) if lines else ""


def start(repo, args, cwd):
    return subprocess.Popen([sys.executable, os.path.join(repo, "main.py")] + args, cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc, timeout):
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out, False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # our own child's process group
        out, _ = proc.communicate()
        return None, out, True


def short(repo, args, ctx):
    """The command with repo / fixture / tmp paths abbreviated."""
    s = " ".join(args)
    s = s.replace(f"--config={repo}/configs/", "--config=configs/").replace(repo + "/", "")
    s = s.replace(f"--config.data_dir={DATA_DIR}", "").replace(ctx["tmp"] + "/", "TMP/")
    s = s.replace(ctx["fixtures"] + "/", "FIX/")
    s = re.sub(r"--config\.(image_size=16|model\.width_multiplier=0\.0625|batch_size=16|num_train_steps=2|"
               r"train_split=train\[:256\]|test_split=test\[:128\]|eval_batch_size=64|knn_monitor=False|"
               r"write_pictures=False|knn\.k=10|linear\.epochs=1|linear\.batch_size=16|finetune\.epochs=1|"
               r"finetune\.batch_size=16|train_split=train|test_split=test)(?= |$)", "", s)
    s = re.sub(r" +", " ", s).strip()
    return "python main.py " + s + " [tiny]"


# ----------------------------------------------------------------- fixtures


def write_images(folder, n, fmt="JPEG", seed=0):
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    ext = ".jpg" if fmt == "JPEG" else ".png"
    for i in range(n):
        arr = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, f"img{i:03d}{ext}"), fmt)


def labelled(root, train=("cat", "dog"), test=("cat", "dog"), n_train=8, n_test=4, empty_train=()):
    for c in train:
        write_images(os.path.join(root, "train", c), 0 if c in empty_train else n_train, seed=hash(c) % 100)
        os.makedirs(os.path.join(root, "train", c), exist_ok=True)
    for c in test:
        write_images(os.path.join(root, "test", c), n_test, seed=hash(c) % 100 + 7)


def make_fixtures(repo, fix):
    os.makedirs(fix, exist_ok=True)
    done = os.path.join(fix, ".images_done")
    if not os.path.exists(done):
        labelled(os.path.join(fix, "folder_ok"))
        labelled(os.path.join(fix, "folder_no_test"), test=())
        labelled(os.path.join(fix, "folder_one_class"), train=("cat",), test=("cat",))
        labelled(os.path.join(fix, "folder_class_without_train"), empty_train=("dog",))
        for kind in ("empty", "truncated"):
            root = os.path.join(fix, f"folder_{kind}_jpg")
            labelled(root)
            bad = os.path.join(root, "train", "cat", "bad.jpg")
            _bad_jpeg(bad, os.path.join(root, "train", "cat", "img000.jpg"), kind)
            root = os.path.join(fix, f"images_{kind}_jpg")
            write_images(root, 16)
            _bad_jpeg(os.path.join(root, "bad.jpg"), os.path.join(root, "img000.jpg"), kind)
        write_images(os.path.join(fix, "images_ok"), 16)
        os.makedirs(os.path.join(fix, "images_empty"), exist_ok=True)
        os.makedirs(os.path.join(fix, "images_txt"), exist_ok=True)
        for i in range(3):
            with open(os.path.join(fix, "images_txt", f"note{i}.txt"), "w") as f:
                f.write("not an image\n")
        open(done, "w").close()
    pre = os.path.join(fix, "pretrained")
    if not os.path.exists(os.path.join(pre, "config.json")):
        _fixture_run(repo, tiny(repo) + [f"--workdir={pre}"], "pretrained")
    ft = os.path.join(fix, "finetune")
    if not os.path.isdir(os.path.join(ft, "finetuned")):
        _fixture_run(repo, evalargs(repo, "finetune", pre) + [f"--workdir={ft}"], "finetune")


def _bad_jpeg(path, good, kind):
    if kind == "empty":
        open(path, "wb").close()
    else:
        data = open(good, "rb").read()
        with open(path, "wb") as f:
            f.write(data[:len(data) // 2])


def _fixture_run(repo, args, name):
    print(f"fixture {name}: {' '.join(args)}", flush=True)
    proc = start(repo, args, tempfile.mkdtemp(prefix=f"fix_{name}_"))
    rc, out, timed_out = finish(proc, 600)
    if rc != 0:
        sys.exit(f"fixture {name} failed (rc {rc}):\n{out[-3000:]}")


# ----------------------------------------------------------------- case helpers


def copy_pretrained(ctx, name="run"):
    dst = os.path.join(ctx["tmp"], name)
    shutil.copytree(os.path.join(ctx["fixtures"], "pretrained"), dst)
    return dst


def corrupt_checkpoint(workdir):
    ckpts = os.path.join(workdir, "checkpoints")
    latest = max((d for d in os.listdir(ckpts) if d.isdigit()), key=int)
    files = [os.path.join(f, n) for f, _, ns in os.walk(os.path.join(ckpts, latest)) for n in ns]
    biggest = max(files, key=os.path.getsize)
    size = os.path.getsize(biggest)
    with open(biggest, "r+b") as f:
        f.truncate(size // 2)
    return f"truncated {os.path.relpath(biggest, workdir)} {size} -> {size // 2} bytes"


def metrics_note(path, before_lines):
    if not os.path.exists(path):
        return "metrics.jsonl absent"
    lines = open(path).read().splitlines()
    return f"metrics.jsonl lines {before_lines} -> {len(lines)}"


# ----------------------------------------------------------------- cases
# Each case: name, what (the user's mistake), build(ctx) -> (args, note-or-None);
# optional post(ctx, result) -> note; optional runner(ctx) for special cases.
# ctx: repo, tmp (the cwd), fixtures, wd (default workdir TMP/run, not existing).

R = lambda ctx: ctx["repo"]  # noqa: E731
F = lambda ctx, name: os.path.join(ctx["fixtures"], name)  # noqa: E731
WD = lambda ctx: f"--workdir={ctx['wd']}"  # noqa: E731


def _case(name, what, build, post=None, runner=None, expect="error"):
    return dict(name=name, what=what, build=build, post=post, runner=runner, expect=expect)


def _pretrain(*flags):
    """A case's arguments: the tiny pretraining flags, then ``flags``, then its workdir."""
    return lambda ctx: tiny(R(ctx)) + [*flags, WD(ctx)]


def _tmpfile(ctx, name, content=""):
    p = os.path.join(ctx["tmp"], name)
    with open(p, "w") as f:
        f.write(content)
    return p


def _disk_full(ctx):
    mount = os.path.join(ctx["tmp"], "small")
    os.makedirs(mount)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", mount], check=True)
    ctx["wd"] = os.path.join(mount, "run")
    ctx["note"] = "tmpfs 3 MB at TMP/small (lazily unmounted after)"
    return tiny(R(ctx)) + ["--config.num_train_steps=40", "--config.checkpoint_every_steps=2",
                           "--config.keep_checkpoints=50", WD(ctx)]


def _unmount(ctx):
    subprocess.run(["umount", "-l", os.path.join(ctx["tmp"], "small")], check=False)
    return None


def _eval_into_pretrain(ctx):
    wd = copy_pretrained(ctx)
    ctx["metrics_before"] = len(open(os.path.join(wd, "metrics.jsonl")).read().splitlines())
    ctx["wd"] = wd
    return evalargs(R(ctx), "knn", wd) + [WD(ctx)]


def _resume_args(ctx, extra):
    ctx["wd"] = copy_pretrained(ctx)
    return tiny(R(ctx)) + list(extra) + [WD(ctx)]


def _corrupt_knn(ctx):
    wd = copy_pretrained(ctx, "pre")
    ctx["note"] = corrupt_checkpoint(wd)
    return evalargs(R(ctx), "knn", wd) + [WD(ctx)]


def _corrupt_all_knn(ctx):
    wd = copy_pretrained(ctx, "pre")
    n = 0
    for folder, _, names in os.walk(os.path.join(wd, "checkpoints")):
        for name in names:
            path = os.path.join(folder, name)
            size = os.path.getsize(path)
            if size > 1024:
                with open(path, "r+b") as f:
                    f.truncate(size // 2)
                n += 1
    ctx["note"] = f"truncated {n} files to half"
    return evalargs(R(ctx), "knn", wd) + [WD(ctx)]


def _corrupt_resume(ctx):
    ctx["wd"] = copy_pretrained(ctx)
    ctx["note"] = corrupt_checkpoint(ctx["wd"])
    return tiny(R(ctx)) + ["--config.num_train_steps=4", WD(ctx)]


def _no_config_json(ctx):
    wd = copy_pretrained(ctx, "pre")
    os.remove(os.path.join(wd, "config.json"))
    return evalargs(R(ctx), "knn", wd) + [WD(ctx)]


def _empty_pretrained(ctx):
    d = os.path.join(ctx["tmp"], "empty_pre")
    os.makedirs(d)
    return evalargs(R(ctx), "knn", d) + [WD(ctx)]


def _not_prepared(ctx):
    d = os.path.join(ctx["tmp"], "empty_tfds")
    os.makedirs(d)
    return tiny(R(ctx)) + [f"--config.data_dir={d}", "--config.download=False", WD(ctx)]


def _finetune_existing(ctx):
    ctx["wd"] = os.path.join(ctx["tmp"], "ft")
    shutil.copytree(F(ctx, "finetune"), ctx["wd"])
    return evalargs(R(ctx), "finetune", F(ctx, "pretrained")) + [WD(ctx)]


def _distill_from_pretraining(ctx):
    return [f"--config={R(ctx)}/configs/distill.py", f"--config.teacher={F(ctx, 'pretrained')}",
            f"--config.data_dir={DATA_DIR}", "--config.train_split=train[:256]", "--config.test_split=test[:128]",
            "--config.distill.batch_size=16", "--config.distill.epochs=0.125", "--config.eval_batch_size=64",
            WD(ctx)]


def _workdir_file(ctx):
    ctx["wd"] = _tmpfile(ctx, "run", "I am a file\n")
    return tiny(R(ctx)) + [WD(ctx)]


def _post_metrics(ctx, res):
    return metrics_note(os.path.join(ctx["wd"], "metrics.jsonl"), ctx.get("metrics_before"))


def run_concurrent(ctx):
    """Two pretraining runs on one workdir: the second starts 20 s after the first."""
    repo = R(ctx)
    # 200 steps (the brief) finished in ~23 s here, before the second run got going: 600 keep them overlapping
    args = tiny(repo) + ["--config.num_train_steps=600", "--config.log_every_steps=25", WD(ctx)]
    first = start(repo, args, ctx["tmp"])
    time.sleep(20)
    t0 = time.time()
    second = start(repo, args, ctx["tmp"])
    rc, out, timed_out = finish(second, TIMEOUT)
    secs = time.time() - t0
    first_alive = first.poll() is None
    if first_alive:
        os.killpg(first.pid, signal.SIGKILL)
    out1, _ = first.communicate()
    ctx["extra_output"] = out1
    path = os.path.join(ctx["wd"], "metrics.jsonl")
    steps = []
    if os.path.exists(path):
        for line in open(path):
            try:
                steps.append(json.loads(line)["step"])
            except (ValueError, KeyError):
                steps.append("bad")
    decreasing = any(isinstance(a, int) and isinstance(b, int) and b < a for a, b in zip(steps, steps[1:]))
    def marks(text):
        keep = re.compile(r"(from step \d+|Resumed from step \d+|finished at step \S+)")
        return [re.sub(r"^[IWEF](\d{4}) ([\d:]+)\.\d+ .*", r"\2 ", l) + keep.search(l).group(1)
                for l in text.splitlines() if keep.search(l)]
    ckpts = os.path.join(ctx["wd"], "checkpoints")
    seq = []  # run-length step sequence of metrics.jsonl
    for s_ in steps:
        if not seq or seq[-1] != s_:
            seq.append(s_)
    note = (f"first run: {marks(out1)}; second run: {marks(out)}; first still alive when second ended: "
            f"{first_alive} (first rc {first.returncode}); checkpoints at end: "
            f"{sorted(os.listdir(ckpts)) if os.path.isdir(ckpts) else None}; metrics.jsonl {len(steps)} lines, "
            f"goes backwards: {decreasing}; step sequence {seq}")
    return args, rc, out, timed_out, secs, note


CASES = [
    # --- the command line and the recipe
    _case("unknown_recipe", "recipe file that does not exist",
          lambda c: [f"--config={R(c)}/configs/nope.py", WD(c)]),
    _case("mistyped_field", "mistyped config field",
          _pretrain("--config.batchsize=8")),
    _case("bad_value_type", "non-numeric value for an int field",
          _pretrain("--config.batch_size=abc")),
    _case("unknown_flag", "mistyped flag (--wrokdir)",
          lambda c: tiny(R(c)) + [f"--wrokdir={c['wd']}"]),
    _case("stray_argument", "stray positional argument",
          lambda c: tiny(R(c)) + [WD(c), "extra"]),
    _case("negative_batch", "negative batch size",
          _pretrain("--config.batch_size=-16")),
    _case("batch_not_multiple_devices", "batch 15 on 2 devices",
          _pretrain("--config.batch_size=15")),
    _case("image_size_not_mult8", "image_size 20 with the CIFAR stem",
          _pretrain("--config.image_size=20"), expect="ok (only >= 8 is required)"),
    _case("image_size_too_small", "image_size 4 with the CIFAR stem (downsamples by 8)",
          _pretrain("--config.image_size=4")),
    _case("nonfinite_policy_typo", "nonfinite_policy='ignore'",
          _pretrain("--config.nonfinite_policy=ignore")),
    _case("memory_size_bad", "memory.size not a multiple of 2*batch",
          _pretrain("--config.memory.size=10")),
    _case("eval_batch_not_multiple", "eval_batch_size 63 on 2 devices",
          _pretrain("--config.eval_batch_size=63")),
    _case("init_from_missing", "pretraining init_from that does not exist",
          _pretrain("--config.init_from=/nonexistent/run")),
    # --- data
    _case("unknown_dataset", "unknown TFDS dataset name",
          _pretrain("--config.dataset=cifar11")),
    _case("data_dir_missing", "data_dir that does not exist (download=True default, no network)",
          lambda c: tiny(R(c)) + [f"--config.data_dir={c['tmp']}/no_such_dir", WD(c)]),
    _case("not_prepared_no_download", "dataset not prepared in an empty data_dir, download=False",
          _not_prepared),
    _case("bad_split", "misspelt split (trian[:256])",
          _pretrain("--config.train_split=trian[:256]")),
    _case("batch_larger_than_dataset", "train[:8] with batch 16",
          _pretrain("--config.train_split=train[:8]")),
    _case("images_missing_folder", "images: folder that does not exist",
          lambda c: folder_tiny(R(c), "images:/nonexistent/photos") + [WD(c)]),
    _case("images_empty_folder", "images: empty folder",
          lambda c: folder_tiny(R(c), "images:" + F(c, "images_empty")) + [WD(c)]),
    _case("images_only_txt", "images: folder of .txt files only",
          lambda c: folder_tiny(R(c), "images:" + F(c, "images_txt")) + [WD(c)]),
    _case("images_empty_jpg", "images: folder with one 0-byte .jpg",
          lambda c: folder_tiny(R(c), "images:" + F(c, "images_empty_jpg")) + [WD(c)], expect="ok or error"),
    _case("images_truncated_jpg", "images: folder with one truncated .jpg",
          lambda c: folder_tiny(R(c), "images:" + F(c, "images_truncated_jpg")) + [WD(c)],
          expect="ok or error"),
    _case("folder_empty_jpg", "folder: dataset with one 0-byte .jpg",
          lambda c: folder_tiny(R(c), "folder:" + F(c, "folder_empty_jpg")) + [WD(c)], expect="ok or error"),
    _case("folder_truncated_jpg", "folder: dataset with one truncated .jpg",
          lambda c: folder_tiny(R(c), "folder:" + F(c, "folder_truncated_jpg")) + [WD(c)],
          expect="ok or error"),
    _case("folder_missing", "folder: root that does not exist",
          lambda c: folder_tiny(R(c), "folder:/nonexistent/labelled") + [WD(c)]),
    _case("folder_no_test_split_knn", "labelled folder without test/ given to knn",
          lambda c: folder_eval(R(c), "knn", F(c, "pretrained"), "folder:" + F(c, "folder_no_test")) + [WD(c)]),
    _case("folder_one_class_knn", "labelled folder with a single class, knn",
          lambda c: folder_eval(R(c), "knn", F(c, "pretrained"), "folder:" + F(c, "folder_one_class")) + [WD(c)],
          expect="ok or error"),
    _case("folder_class_no_train_knn", "a class with test but no train images, knn",
          lambda c: folder_eval(R(c), "knn", F(c, "pretrained"), "folder:" + F(c, "folder_class_without_train"))
          + [WD(c)], expect="ok or error"),
    _case("folder_slice_split", "folder: with a slice train[:50%]",
          lambda c: folder_eval(R(c), "knn", F(c, "pretrained"), "folder:" + F(c, "folder_ok"),
                                ["--config.train_split=train[:50%]"]) + [WD(c)]),
    _case("knn_k_larger_than_bank", "knn k=200 on a 16-image folder",
          lambda c: folder_eval(R(c), "knn", F(c, "pretrained"), "folder:" + F(c, "folder_ok"),
                                ["--config.knn.k=200"]) + [WD(c)], expect="ok or error"),
    _case("images_to_knn", "unlabelled images: dataset given to knn",
          lambda c: folder_eval(R(c), "knn", F(c, "pretrained"), "images:" + F(c, "images_ok")) + [WD(c)]),
    _case("images_to_linear_eval", "unlabelled images: dataset given to linear_eval",
          lambda c: folder_eval(R(c), "linear_eval", F(c, "pretrained"), "images:" + F(c, "images_ok")) + [WD(c)]),
    # --- workdir
    _case("workdir_is_file", "workdir is an existing file", _workdir_file),
    _case("workdir_proc", "unwritable workdir (/proc/simclr; chmod does not stop root)",
          lambda c: tiny(R(c)) + ["--workdir=/proc/simclr"]),
    _case("workdir_gcs_offline", "gs:// workdir without network",
          lambda c: tiny(R(c)) + ["--workdir=gs://bucket/run"]),
    # --- pretrained / checkpoints
    _case("pretrained_unset", "knn without --config.pretrained",
          lambda c: evalargs(R(c), "knn", None) + [WD(c)]),
    _case("pretrained_missing", "knn pretrained=/nonexistent",
          lambda c: evalargs(R(c), "knn", "/nonexistent") + [WD(c)]),
    _case("pretrained_is_file", "knn pretrained= a file",
          lambda c: evalargs(R(c), "knn", _tmpfile(c, "weights.txt", "x\n")) + [WD(c)]),
    _case("pretrained_empty_dir", "knn pretrained= an empty directory", _empty_pretrained),
    _case("pretrained_no_config_json", "knn from a pretraining workdir whose config.json was deleted",
          _no_config_json),
    _case("checkpoint_step_missing", "knn checkpoint_step=7 (only step 2 exists)",
          lambda c: evalargs(R(c), "knn", F(c, "pretrained"), ["--config.checkpoint_step=7"]) + [WD(c)]),
    _case("model_contradiction", "knn model.depth=50 contradicting the checkpoint",
          lambda c: evalargs(R(c), "knn", F(c, "pretrained"), ["--config.model.depth=50"]) + [WD(c)]),
    _case("corrupt_checkpoint_knn", "knn from a checkpoint with its largest file cut in half", _corrupt_knn),
    _case("corrupt_checkpoint_all_knn", "knn from a checkpoint with every file > 1 KB cut in half",
          _corrupt_all_knn),
    _case("corrupt_checkpoint_resume", "resume pretraining on a checkpoint cut in half", _corrupt_resume),
    _case("resume_changed_batch", "resume a 2-step run with batch 32, 4 steps",
          lambda c: _resume_args(c, ["--config.batch_size=32", "--config.num_train_steps=4"]),
          expect="refuse (or documented)"),
    _case("distill_teacher_is_pretraining", "distill with a pretraining workdir as teacher",
          _distill_from_pretraining),
    _case("finetune_existing_finished", "finetune into a workdir holding a finished finetune", _finetune_existing),
    _case("finetune_label_fraction_0", "finetune label_fraction=0",
          lambda c: evalargs(R(c), "finetune", F(c, "pretrained"), ["--config.finetune.label_fraction=0"])
          + [WD(c)]),
    _case("eval_workdir_is_pretraining", "knn whose --workdir is the pretraining workdir", _eval_into_pretrain,
          post=_post_metrics, expect="ok or error (must not touch metrics.jsonl)"),
    # --- training numerics
    _case("temperature_1e-6", "temperature 1e-6",
          _pretrain("--config.temperature=1e-6"), expect="ok or error"),
    _case("lr_1e30_skip", "nonfinite_policy=skip with learning rate 1e30",
          lambda c: tiny(R(c)) + ["--config.nonfinite_policy=skip", "--config.optimizer.base_learning_rate=1e30",
                                  "--config.num_train_steps=4", WD(c)], expect="ok or error"),
    _case("lr_1e30_stop", "learning rate 1e30, default nonfinite_policy=stop",
          lambda c: tiny(R(c)) + ["--config.optimizer.base_learning_rate=1e30",
                                  "--config.num_train_steps=4", WD(c)], expect="ok or error"),
    _case("disk_full", "a 3 MB disk fills up while saving checkpoints (tmpfs)",
          lambda c: _disk_full(c), post=lambda c, rc: _unmount(c), expect="error"),
    # --- concurrency
    _case("two_runs_same_workdir", "second pretraining (600 steps) started 20 s after the first, same workdir",
          None, runner=run_concurrent),
]


# ----------------------------------------------------------------- running


def run_case(case, repo, fixtures, work, keep):
    tmp = tempfile.mkdtemp(prefix=case["name"] + "_", dir=work)
    ctx = dict(repo=repo, fixtures=fixtures, tmp=tmp, wd=os.path.join(tmp, "run"))
    before_tmp = None
    note = None
    try:
        if case["runner"]:
            before_tmp = snapshot(tmp)
            args, rc, out, timed_out, secs, note = case["runner"](ctx)
        else:
            args = case["build"](ctx)
            before_tmp = snapshot(tmp)  # a workdir outside it (/proc, gs://) is not tracked
            t0 = time.time()
            rc, out, timed_out = finish(start(repo, args, tmp), TIMEOUT)
            secs = time.time() - t0
            note = ctx.get("note")
            if case["post"]:
                note = "; ".join(filter(None, [note, case["post"](ctx, rc)]))
        new, changed, gone = diff(before_tmp, snapshot(tmp))
        written = [f"+{p}" for p in new] + [f"~{p}" for p in changed] + [f"-{p}" for p in gone]
        written = [w.replace(tmp + "/", "") for w in written]
        kept = meaningful_lines(out)
        return dict(name=case["name"], what=case["what"], expect=case["expect"], command=short(repo, args, ctx),
                    rc=rc, timed_out=timed_out, lines=len(kept), traceback="Traceback (most recent call last)" in out,
                    last=last_error_line(kept, out), seconds=round(secs, 1), written=written, note=note,
                    output=out, extra_output=ctx.get("extra_output"))
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def verdict(r):
    if r["timed_out"]:
        return "timeout"
    if r["traceback"]:
        return "traceback"
    if r["rc"] == 0:
        return "accepted (rc 0)"
    if r["lines"] <= 2:
        return "clear"
    return "unclear"


def summarise_written(written, limit=8):
    if not written:
        return "-"
    groups = {}
    for w in written:
        sign, parts = w[0], w[1:].split("/")
        g = groups.setdefault(parts[0], {"sign": None, "children": {}})
        if len(parts) == 1:
            g["sign"] = sign
            continue
        sign0, deep = g["children"].get(parts[1], (None, False))
        if len(parts) == 2:
            sign0 = sign
        g["children"][parts[1]] = (sign0 or sign, deep or len(parts) > 2)
    out = []
    for top, g in groups.items():
        kids = [("" if g["sign"] == "+" else sg) + name + ("/" if deep else "")
                for name, (sg, deep) in g["children"].items()]
        more = f", +{len(kids) - limit} more" if len(kids) > limit else ""
        body = ("/{" + ", ".join(kids[:limit]) + more + "}") if kids else ""
        out.append((g["sign"] or "") + top + body)
    return "; ".join(out)


def md_escape(s):
    return str(s).replace("|", "\\|").replace("\n", " ")


def write_report(results, out, repo):
    counts = {}
    for r in results:
        r["verdict"] = verdict(r)
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    wrote = sum(1 for r in results if r["written"])
    lines = [f"# Fault catalogue: {repo}", "",
             f"{len(results)} cases. Verdicts: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
             + f". Cases that wrote/changed something in workdir or cwd: {wrote}.", "",
             "verdict: clear = rc != 0, no traceback, <= 2 meaningful lines; unclear = rc != 0, no traceback, "
             "more lines; accepted = rc 0. lines = stdout+stderr lines without absl I/W records (and their "
             "continuation lines) and W0000/I0000/E0000 noise. written: + new, ~ changed, - removed, relative "
             "to the case's temp cwd (workdir = run/ unless stated).", "",
             "| # | case | mistake | command | rc | lines | tb | verdict | last error line | s | written | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(results, 1):
        lines.append("| " + " | ".join(md_escape(x) for x in [
            i, r["name"], r["what"], f"`{r['command']}`", "timeout" if r["timed_out"] else r["rc"], r["lines"],
            "yes" if r["traceback"] else "no", r["verdict"], r["last"], r["seconds"],
            summarise_written(r["written"]), r["note"] or ""]) + " |")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    slim = [{k: v for k, v in r.items() if k not in ("output", "extra_output")} for r in results]
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(dict(repo=repo, counts=counts, wrote=wrote, cases=slim), f, indent=1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repo", default=HERE, help="the checkout whose main.py runs (default: this one)")
    p.add_argument("--out", required=True)
    p.add_argument("--fixtures", default=os.path.join(tempfile.gettempdir(), "simclr_faults", "fixtures"))
    p.add_argument("--only", default="", help="comma-separated case names")
    p.add_argument("--skip", default="", help="comma-separated case names")
    p.add_argument("--keep", action="store_true", help="keep each case's temp cwd")
    p.add_argument("--list", action="store_true")
    p.add_argument("--rescore", action="store_true",
                   help="recompute lines/last/verdicts from OUT's partial jsonl and logs, without running")
    a = p.parse_args()
    if a.list:
        print("\n".join(c["name"] for c in CASES))
        return
    repo = os.path.abspath(a.repo)
    logs = os.path.splitext(os.path.abspath(a.out))[0] + "_logs"
    jsonl = os.path.splitext(a.out)[0] + ".partial.jsonl"
    if a.rescore:
        results = {}
        for line in open(jsonl):
            r = json.loads(line)
            r["output"] = open(os.path.join(logs, r["name"] + ".log")).read()
            kept = meaningful_lines(r["output"])
            r["lines"], r["last"] = len(kept), last_error_line(kept, r["output"])
            case = next((c for c in CASES if c["name"] == r["name"]), None)
            if case:
                r["what"], r["expect"] = case["what"], case["expect"]
            results[r["name"]] = r  # a rerun case replaces its earlier row
        order = [c["name"] for c in CASES]
        write_report(sorted(results.values(), key=lambda r: order.index(r["name"]) if r["name"] in order else 999),
                     a.out, repo)
        return
    make_fixtures(repo, a.fixtures)
    cases = [c for c in CASES if (not a.only or c["name"] in a.only.split(","))
             and c["name"] not in a.skip.split(",")]
    work = os.path.join(os.path.dirname(os.path.abspath(a.out)), "tmp_cases")
    os.makedirs(work, exist_ok=True)
    os.makedirs(logs, exist_ok=True)
    if not a.only and os.path.exists(jsonl):
        os.remove(jsonl)  # a full run starts afresh; --only appends (then --rescore merges, last row wins)
    results = []
    for case in cases:
        print(f"== {case['name']}", flush=True)
        r = run_case(case, repo, a.fixtures, work, a.keep)
        with open(os.path.join(logs, case["name"] + ".log"), "w") as f:
            f.write(r["output"])
        if r.get("extra_output"):
            with open(os.path.join(logs, case["name"] + ".first.log"), "w") as f:
                f.write(r["extra_output"])
        print(f"   rc={r['rc']} timeout={r['timed_out']} lines={r['lines']} tb={r['traceback']} "
              f"{r['seconds']}s wrote={len(r['written'])} :: {r['last'][:150]}", flush=True)
        with open(jsonl, "a") as f:
            f.write(json.dumps({k: v for k, v in r.items() if k not in ("output", "extra_output")}) + "\n")
        results.append(r)
        write_report(results, a.out, repo)


if __name__ == "__main__":
    main()
