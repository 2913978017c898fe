"""Eight fake CPU devices for every test, and small real image folders on disk."""

import atexit
import contextlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The suite's cost is XLA compiling AlexNet's steps on 2 cores, far more than running them: LLVM's
# cheaper code generation nearly halves a compilation (tests/parallel/test_schemes.py: 80 s -> 46 s)
# and changes no result a test checks. Set for this process and, through child_env, for every
# process the tests start; flags already in XLA_FLAGS come last and win.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if FAST_COMPILE_FLAGS not in os.environ.get("XLA_FLAGS", ""):  # pytest-xdist workers inherit it
    os.environ["XLA_FLAGS"] = f"{FAST_COMPILE_FLAGS} {os.environ.get('XLA_FLAGS', '')}".strip()


def _ram_backed_temp_root(path="/dev/shm", min_free=8 << 30):
    """Put tmp_path under a RAM-backed tmpfs when one has room (and the user chose no place).

    Orbax syncs every checkpoint to storage; on this project's 2-core CI disk the syncs of the
    suite's half-gigabyte AlexNet checkpoints took about 1.5 minutes. A tmpfs is a real file
    system whose syncs cost nothing. Passing tests' directories are removed as they finish
    (tmp_path_retention_policy = "failed" in pyproject.toml), so little is held at a time.
    """
    if "PYTEST_DEBUG_TEMPROOT" in os.environ or "TMPDIR" in os.environ:
        return
    try:
        with open("/proc/mounts") as mounts:
            tmpfs = any(line.split()[1:3] == [path, "tmpfs"] for line in mounts)
        stats = os.statvfs(path)
    except OSError:
        return
    if tmpfs and stats.f_bavail * stats.f_frsize >= min_free and os.access(path, os.W_OK):
        os.environ["PYTEST_DEBUG_TEMPROOT"] = path


_ram_backed_temp_root()

# One persistent compilation cache for the whole session, shared by the pytest-xdist workers and
# the launch.py subprocesses: the same AlexNet step is compiled once, not once per run. The
# controlling pytest process (or the only one, without workers) owns it and removes it at exit.
_WORKER = "PYTEST_XDIST_WORKER" in os.environ
_CACHE = os.path.join(tempfile.gettempdir(), f"alexnet_jax_test_cache_{os.getppid() if _WORKER else os.getpid()}")
os.makedirs(_CACHE, exist_ok=True)
if not _WORKER:
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# fc6/fc7's width for the networks and launched runs whose subject is not the width: a 32nd of the paper's
# 4096 (every split of the schemes still divides it: 128 / 8 = 16 units a device). On 8 fake devices each
# replica's optimizer update is most of a step's time; at 128 units fc6 holds 1.2M weights instead of 4.7M.
TEST_HIDDEN_UNITS = 128
NARROW_FC = f"--config.hidden_units={TEST_HIDDEN_UNITS}"


def child_env(devices=None, **extra):
    """The environment of a child process running this checkout's code (not whatever an editable install
    points to): PYTHONPATH names the checkout's src/ first, JAX on the CPU, `devices` fake CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "src"), REPO])
    if devices is not None:
        env["XLA_FLAGS"] = f"{FAST_COMPILE_FLAGS} --xla_force_host_platform_device_count={devices}"
    return env


_BLOCKER = textwrap.dedent(
    '''
    """Make the packages named in ALEXNET_TEST_BLOCKED_IMPORTS look not installed.

    The path finder is wrapped so that it does not find them: find_spec gives None and import
    raises ModuleNotFoundError, as where they are missing (importlib.metadata still sees them).
    """
    import importlib.machinery
    import os
    import sys

    _BLOCKED = frozenset(os.environ.get("ALEXNET_TEST_BLOCKED_IMPORTS", "").split(","))


    class _PathFinderWithout:
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.partition(".")[0] in _BLOCKED:
                return None
            return importlib.machinery.PathFinder.find_spec(name, path, target)

        @classmethod
        def find_distributions(cls, *args, **kwargs):  # what importlib.metadata asks
            return importlib.machinery.PathFinder.find_distributions(*args, **kwargs)

        @classmethod
        def invalidate_caches(cls):
            importlib.machinery.PathFinder.invalidate_caches()


    sys.meta_path[:] = [
        _PathFinderWithout if finder is importlib.machinery.PathFinder else finder for finder in sys.meta_path
    ]
    '''
)


def env_without(tmp_path, blocked, **extra):
    """child_env, in which the packages `blocked` cannot be imported (as on a host that lacks them)."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_BLOCKER)
    env = child_env(**extra)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    env["ALEXNET_TEST_BLOCKED_IMPORTS"] = ",".join(blocked)
    return env


@contextlib.contextmanager
def mounted_tmpfs(directory, options, *, without=""):
    """A real tmpfs mounted at `directory` with `options` (e.g. "size=1m,ro"), unmounted afterwards.

    Mounting needs root: elsewhere the test is skipped, saying so (and `without`: what covers it then).
    """
    os.makedirs(directory, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}){without}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


EXTRAS_INSTALL = "pip install -r requirements-extras.txt"


def optional_torch_without_triton():
    """torch's triton (its GPU code generator) segfaults a process that has loaded TensorFlow, when
    torchvision imports it through torch._dynamo; a pytest-xdist worker runs many files, so block it
    here as export.without_triton does in the tool. No test compiles with torch in this process."""
    from alexnet_jax.commands import export

    export.without_triton()


optional_torch_without_triton()


def optional(module: str):
    """Import an optional package of requirements-extras.txt, or skip saying how to install it
    (CI installs the extras, so nothing is skipped there)."""
    return pytest.importorskip(module, reason=f"needs {module}, an optional package: {EXTRAS_INSTALL}")


def launch_command(workdir, *overrides, config="demo"):
    """python -u launch.py --config=configs/CONFIG.py --workdir=WORKDIR OVERRIDES...: the real entry point."""
    return [
        sys.executable,
        "-u",
        os.path.join(REPO, "launch.py"),
        f"--config={os.path.join(REPO, 'configs', f'{config}.py')}",
        f"--workdir={workdir}",
        *overrides,
    ]


class OutputReader:
    """A child's stdout, read by a thread, so waiting for a line has a deadline even if the child hangs silent."""

    def __init__(self, stream):
        import queue
        import threading

        self.lines, self.seen = queue.Queue(), []
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream):
        for line in iter(stream.readline, ""):
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern, timeout=300):
        """Lines read until one matches `pattern`; fails at the deadline or when the child's output ends."""
        import queue
        import re
        import time

        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(remaining, 0.01))
            except queue.Empty:
                raise AssertionError(
                    f"no line matching {pattern!r} within {timeout} s:\n{''.join(self.seen)}"
                ) from None
            if line is None:
                raise AssertionError(f"output ended without a line matching {pattern!r}:\n{''.join(self.seen)}")
            self.seen.append(line)
            if re.search(pattern, line):
                return "".join(self.seen)

    def rest(self, timeout=120):
        """Everything the child prints until its output ends (after it exits)."""
        import queue

        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"the child's output did not end within {timeout} s") from None
            if line is None:
                return "".join(self.seen)
            self.seen.append(line)


def write_image_folder(root, *, classes=3, train_per_class=6, eval_per_class=(3, 2, 2), seed=0):
    """A real image-folder dataset: JPEGs of assorted sizes, one PNG, under train/ and validation/.

    Each class has its own dominant colour so a model can learn something.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]
    for split, counts in (("train", [train_per_class] * classes), ("validation", list(eval_per_class))):
        for label in range(classes):
            class_dir = root / split / f"class_{label}"
            class_dir.mkdir(parents=True, exist_ok=True)
            for index in range(counts[label]):
                height, width = rng.integers(48, 96, size=2)
                noise = rng.integers(-40, 40, size=(height, width, 3))
                pixels = np.clip(np.array(colours[label]) + noise, 0, 255).astype(np.uint8)
                suffix = "png" if (split, label, index) == ("train", 0, 0) else "jpg"
                Image.fromarray(pixels).save(class_dir / f"img_{index}.{suffix}")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"))


PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "rocket", "immunohistochemistry")


def photo_crops(count, size, seed=0):
    """uint8 [count, size, size, 3]: random square crops of scikit-image's photographs, resized."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        photo = Image.fromarray(getattr(skimage.data, PHOTOS[index % len(PHOTOS)])()).convert("RGB")
        side = min(photo.size) // 2
        left, top = (int(rng.integers(0, extent - side + 1)) for extent in photo.size)
        images.append(np.asarray(photo.crop((left, top, left + side, top + side)).resize((size, size))))
    return np.stack(images)


def write_photo_folder(root, *, photos=PHOTOS, train_per_class=60, eval_per_class=10, crop=160, seed=0):
    """An image folder of real photographs (scikit-image's sample images): one class per photo.

    Each example is a random square crop of its photo (a third to two thirds of the
    shorter side) resized to crop x crop, saved as JPEG: a small real-photo task on
    which a recipe that learns leaves chance quickly.
    """
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, name in enumerate(photos):
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        width, height = photo.size
        for split, count in (("train", train_per_class), ("validation", eval_per_class)):
            class_dir = root / split / name
            class_dir.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                side = int(rng.integers(min(width, height) // 3, 2 * min(width, height) // 3))
                left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
                patch = photo.crop((left, top, left + side, top + side)).resize((crop, crop), Image.BILINEAR)
                patch.save(class_dir / f"{label}_{index:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory):
    """Two classes of real photographs (astronaut, chelsea): 60 training and 10 validation crops each."""
    return write_photo_folder(tmp_path_factory.mktemp("photos"), photos=PHOTOS[:2])


def assert_close(actual, desired, *, rtol=1e-7, atol=0.0, err_msg=""):
    """np.testing.assert_allclose, without its cost on large arrays that pass.

    numpy's builds its report as it checks: 3.3 s for one 38M-parameter fc6 kernel against
    0.3 s for the check alone. This checks first and asks numpy for the report on failure.
    """
    actual, desired = np.asarray(actual), np.asarray(desired)
    if actual.shape == desired.shape and bool(np.all(np.abs(actual - desired) <= atol + rtol * np.abs(desired))):
        return
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol, err_msg=err_msg)


def assert_trees_close(actual, desired, *, rtol=1e-7, atol=0.0):
    """assert_close on every leaf of two pytrees of one structure; a failure names the leaf's path."""
    import jax

    flat_actual, structure = jax.tree_util.tree_flatten_with_path(actual)
    flat_desired, desired_structure = jax.tree_util.tree_flatten(desired)
    assert structure == desired_structure, (structure, desired_structure)
    for (path, a), b in zip(flat_actual, flat_desired):
        assert_close(a, b, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def assert_trees_equal(actual, desired):
    """Bitwise-equal pytrees (np.testing.assert_array_equal's report only on failure)."""
    import jax

    flat_actual, structure = jax.tree_util.tree_flatten_with_path(actual)
    flat_desired, desired_structure = jax.tree_util.tree_flatten(desired)
    assert structure == desired_structure and flat_actual, (structure, desired_structure)
    for (path, a), b in zip(flat_actual, flat_desired):
        a, b = np.asarray(a), np.asarray(b)
        if not (a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)):
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


# Each test file is its own group, so a worker takes whole files and a module's fixtures are built once
# (`--dist loadgroup` in pyproject.toml). The 8-device equivalence tests run AlexNet with TEST_HIDDEN_UNITS
# fc6/fc7 units, not 4096: at the paper's width two of those files at once overran a 24 GB machine and a
# worker was killed.
#
# The longest files go first, so the two workers end together instead of one idling while the other works
# through a long file taken last. Seconds per file, measured in the quick lane on an idle 2-core machine; a
# file missing here counts as short. Stale figures only cost balance, never a result.
FILE_SECONDS = {
    "training/test_paper_recipe.py": 84,
    "parallel/test_schemes.py": 72,
    "training/test_fault_tolerance.py": 63,
    "step/test_train_step.py": 51,
    "commands/test_export.py": 45,
    "training/test_end_to_end.py": 36,
    "data/test_pack.py": 33,
    "step/test_grad_accum.py": 30,
    "parallel/test_parallelism_bench.py": 27,
    "training/test_ablations.py": 25,
    "training/test_levers.py": 23,
    "commands/test_cli.py": 20,
    "reporting/test_figures.py": 20,
    "model/test_fast_ops.py": 16,
    "commands/test_evaluate.py": 12,
    "test_bad_paths.py": 12,
    "test_gpu_bench.py": 11,
    "training/test_never_lose_a_run.py": 11,
    "commands/test_convert.py": 11,
}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    tests = os.path.join(REPO, "tests")

    def seconds(item):
        return FILE_SECONDS.get(os.path.relpath(str(item.fspath), tests), 0)

    items.sort(key=lambda item: -seconds(item))  # stable: a file's tests keep their order
    for item in items:
        item.add_marker(pytest.mark.xdist_group(str(item.fspath)))


def pytest_runtest_logreport(report):
    """ALEXNET_SKIPPED_FILE=PATH: append the id of every skipped test to PATH.

    CI runs the README's test command in the README's environment (no extras), where the tests whose
    subject is an optional package skip; it then installs the extras and runs exactly those tests.
    """
    path = os.environ.get("ALEXNET_SKIPPED_FILE")
    if path and report.skipped and report.when in ("setup", "call"):
        with open(path, "a") as handle:
            handle.write(report.nodeid + "\n")


# --- launched demo runs on an image folder, logging every step (fault tolerance, accumulation, profiling) ---


def _command(workdir, image_folder, *overrides):
    return launch_command(
        workdir,
        "--config.dataset=image_folder",
        f"--config.data_dir={image_folder}",
        "--config.image_size=64",
        "--config.batch_size=8",
        "--config.log_every_steps=1",
        "--config.eval_every_steps=1000",
        "--config.schedule=cosine",
        NARROW_FC,
        *overrides,
    )


def _env(devices):
    return child_env(devices)


def _run(workdir, image_folder, *overrides, devices=2, timeout=400):
    return subprocess.run(
        _command(workdir, image_folder, *overrides), capture_output=True, text=True, env=_env(devices), timeout=timeout
    )


def _start(workdir, image_folder, *overrides, devices=2):
    return subprocess.Popen(
        _command(workdir, image_folder, *overrides),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(devices),
    )


def _wait_for_line(process, pattern, timeout=300):
    """Read the child's output until a line matches; returns everything read (fails at the deadline)."""
    process.reader = getattr(process, "reader", None) or OutputReader(process.stdout)
    return process.reader.wait_for(pattern, timeout)


def _finish(process, timeout=300):
    """Wait for a child started with _start; returns all of its output."""
    process.reader = getattr(process, "reader", None) or OutputReader(process.stdout)
    process.wait(timeout=timeout)
    return process.reader.rest()


def _restore_arrays(workdir, step):
    """The saved train state as numpy arrays (no target: shapes and dtypes from the checkpoint)."""
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    return jax.tree_util.tree_map(np.asarray, restored["state"])


def _train_records(workdir):
    return [r for r in _read_metrics(str(workdir)) if "train/loss" in r]


def _read_metrics(workdir):
    from alexnet_jax.reporting import metrics

    return metrics.read_metrics(workdir)


# --- a miniature ImageNet in the ILSVRC tars' real layout, for the real TFDS imagenet2012 builder ---

SYNSETS = ("n01440764", "n01443537", "n01484850")  # labels 0, 1, 2 of the 1,000
PER_SYNSET = 4
NUM_VAL = 7


def _jpeg(rng, mode="RGB"):
    from PIL import Image

    height, width = rng.integers(70, 110, size=2)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_ilsvrc_tars(manual_dir):
    """ILSVRC2012_img_train.tar (one tar per synset inside) and ILSVRC2012_img_val.tar, as image-net.org ships them."""
    rng = np.random.default_rng(0)
    manual_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(manual_dir / "ILSVRC2012_img_train.tar", "w") as train_tar:
        for synset in SYNSETS:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as synset_tar:
                for index in range(PER_SYNSET):
                    # One CMYK JPEG, as the real set has: TFDS re-encodes it (or our decode copes).
                    mode = "CMYK" if (synset, index) == (SYNSETS[1], 0) else "RGB"
                    _add(synset_tar, f"{synset}_{index + 1}.JPEG", _jpeg(rng, mode))
            _add(train_tar, f"{synset}.tar", inner.getvalue())
    with tarfile.open(manual_dir / "ILSVRC2012_img_val.tar", "w") as val_tar:
        for index in range(1, NUM_VAL + 1):
            _add(val_tar, f"ILSVRC2012_val_{index:08d}.JPEG", _jpeg(rng))
    return manual_dir
