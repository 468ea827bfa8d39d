"""Process-group setup for data-parallel training: one process per GPU, under torchrun, or on the CPU.

    launch(worker, args, device_type="cuda")   # plain launch: spawns one `worker(args)` per visible GPU

Four ways a training process comes to life, all ending in the same `setup()`:
  * a plain `python train.py` on a machine with N > 1 visible GPUs: `launch` spawns N processes;
  * `torchrun` (one or several machines): it already started the processes and set RANK/WORLD_SIZE;
  * `srun python train.py` (SLURM, one task per GPU): `adopt_slurm` turns SLURM's description of the task
    into the variables torchrun would have set, so the rest is the torchrun case;
  * anything else (one GPU, the CPU): one process, no process group at all.
NCCL carries the collectives on CUDA, gloo on the CPU.
"""
import contextlib
import datetime
import os
import re
import signal
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mnv2.cli import ScriptError, UsageError

# The variables a launcher (torchrun, or `launch` below) sets for each process.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


@dataclass(frozen=True)
class Context:
    """Where this process sits in the job."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def launched_by_launcher(env=None):
    """True when a launcher (torchrun or `launch`) started this process as one rank of a job."""
    env = os.environ if env is None else env
    return all(name in env for name in LAUNCHER_VARIABLES)


# SLURM's description of a task of a job step (srun), and the torchrun variable each one becomes.
SLURM_VARIABLES = {"SLURM_PROCID": "RANK", "SLURM_NTASKS": "WORLD_SIZE", "SLURM_LOCALID": "LOCAL_RANK"}
SLURM_BASE_PORT = 29500  # torchrun's default port, offset by the job id so two jobs on a node differ


def expand_hostlist(hostlist):
    """SLURM's compressed node list as host names, in order, without asking scontrol:
    'node[01-03,07],gpu5' -> ['node01', 'node02', 'node03', 'node07', 'gpu5']; the zero padding of a
    range's first bound is kept, and a name may hold several bracket groups ('r[1-2]n[1-2]')."""
    hosts, depth, part = [], 0, ""
    for char in hostlist.strip() + ",":
        if char == "," and depth == 0:
            if part:
                hosts.extend(_expand_host(part))
            part = ""
            continue
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise UsageError(f"SLURM node list {hostlist!r}: unbalanced brackets")
        part += char
    if depth or not hosts:
        raise UsageError(f"SLURM node list {hostlist!r}: cannot read it")
    return hosts


def _expand_host(pattern):
    match = re.match(r"([^\[]*)\[([^\]]*)\](.*)$", pattern)
    if match is None:
        if "[" in pattern or "]" in pattern:
            raise UsageError(f"SLURM node list: cannot read {pattern!r}")
        return [pattern]
    prefix, ranges, rest = match.groups()
    names = []
    for item in ranges.split(","):
        bounds = item.split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            names.append(bounds[0])
        elif len(bounds) == 2 and all(b.isdigit() for b in bounds) and int(bounds[0]) <= int(bounds[1]):
            width = len(bounds[0])
            names.extend(str(i).zfill(width) for i in range(int(bounds[0]), int(bounds[1]) + 1))
        else:
            raise UsageError(f"SLURM node list: cannot read the range {item!r} in {pattern!r}")
    return [prefix + name + tail for name in names for tail in _expand_host(rest)]


def slurm_environment(env=None):
    """The torchrun variables for a process that srun started as one task of several, or {} when this is
    not such a process (torchrun's own variables, when set, win). The master is the first node of the step
    (SLURM_STEP_NODELIST, else the job's list); the port is MASTER_PORT when set, else one derived from the
    job id, so every task agrees on it without talking to the others."""
    env = os.environ if env is None else env
    if launched_by_launcher(env) or not all(name in env for name in SLURM_VARIABLES):
        return {}
    try:
        values = {torchrun: int(env[slurm]) for slurm, torchrun in SLURM_VARIABLES.items()}
    except ValueError:
        raise UsageError("SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID must be integers") from None
    if values["WORLD_SIZE"] <= 1:
        return {}
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise UsageError("SLURM started this task but set no node list (SLURM_JOB_NODELIST), so the master "
                         "address is unknown")
    port = env.get("MASTER_PORT") or str(SLURM_BASE_PORT + int(env.get("SLURM_JOB_ID", "0") or 0) % 10000)
    out = {name: str(value) for name, value in values.items()}
    out.update(MASTER_ADDR=env.get("MASTER_ADDR") or expand_hostlist(nodelist)[0], MASTER_PORT=port)
    if "SLURM_NTASKS_PER_NODE" in env and env["SLURM_NTASKS_PER_NODE"].isdigit():
        out["LOCAL_WORLD_SIZE"] = env["SLURM_NTASKS_PER_NODE"]
    return out


def adopt_slurm():
    """Under srun, describe this task as torchrun would (sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT in the environment); elsewhere a no-op. Returns the variables set."""
    found = slurm_environment()
    os.environ.update(found)
    return found


def resolve_device_type(name):
    """'auto' means CUDA when a GPU is visible, else the CPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA GPU is visible; use --device cpu")
    return name


def processes_to_spawn(device_type, env=None):
    """How many processes a plain launch should start: one per visible GPU, else just this one."""
    if launched_by_launcher(env) or device_type != "cuda":
        return 1
    return max(1, torch.cuda.device_count())


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(local_rank, worker, args, nprocs):
    # A spawned process is a rank of a single-machine job, exactly as torchrun would describe it.
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nprocs),
                      LOCAL_WORLD_SIZE=str(nprocs))
    code = worker(args)
    if code:
        sys.exit(code)  # the launcher reads the job's outcome from the exit codes


def launch(worker, args, device_type):
    """Run `worker(args)` here, or once per visible GPU in spawned processes. Returns an exit code.

    When one spawned rank fails, the others are terminated and its exit code (or 1 for an exception,
    whose traceback is printed) is returned, so the whole job fails in bounded time instead of hanging.
    """
    nprocs = processes_to_spawn(device_type)
    if nprocs == 1:
        return worker(args) or 0
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    context = mp.start_processes(_spawned, args=(worker, args, nprocs), nprocs=nprocs, join=False,
                                 start_method="spawn")

    # A preemption signal sent to the launching process only (e.g. Ctrl-C, `kill PID`) must reach the
    # ranks, which save a checkpoint; without forwarding they would be orphaned mid-epoch.
    def forward(signum, frame):
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as e:
        return e.exit_code if e.exit_code and e.exit_code > 0 else 1
    except mp.ProcessRaisedException as e:
        print(e, flush=True)
        return 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


def setup(device_type, timeout_minutes=30.0):
    """Join the job's process group (if there is one) and pick this rank's device."""
    if not launched_by_launcher() or int(os.environ["WORLD_SIZE"]) == 1:
        device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
        return Context(device=device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible")
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    # The timeout bounds how long a rank waits on a peer that hangs without dying; a peer that dies
    # closes its sockets and the collective fails at once. Joining gets at most JOIN_MINUTES of it: a
    # process that waits for ranks that were never started should say so in minutes, not at the end.
    join = min(timeout_minutes, JOIN_MINUTES)
    address = f"{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ.get('MASTER_PORT', '29500')}"
    if rank == 0 and "SLURM_JOB_ID" in os.environ:
        print(f"SLURM task 0 of {world_size}: waiting up to {join:g} min for the others at {address}",
              flush=True)
    try:
        store = dist.TCPStore(address.rsplit(":", 1)[0], int(address.rsplit(":", 1)[1]), world_size,
                              is_master=rank == 0, timeout=datetime.timedelta(minutes=join))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    except (RuntimeError, ValueError) as e:  # DistStoreError and DistNetworkError are RuntimeErrors
        raise JoinFailed(rank, world_size, address, join, e) from None
    return Context(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


JOIN_MINUTES = 5.0


class JoinFailed(ScriptError, RuntimeError):
    """The job's processes did not all meet: one line saying which rank waited, where, and the likely cause."""

    def __init__(self, rank, world_size, address, minutes, error):
        reason = re.sub(r"^\[[^\]]*\]\s*", "", (str(error).splitlines() or [""])[0])[:160]
        hint = ("under SLURM, start it with `srun python train.py ...`: a plain `python train.py` in a batch "
                f"script of {world_size} tasks is one process waiting for {world_size - 1} that never come"
                if "SLURM_JOB_ID" in os.environ else
                "start every process of the job (torchrun --nproc-per-node, --nnodes) and check that "
                f"{address} is reachable from each")
        super().__init__(f"rank {rank} of {world_size}: the job's processes did not all join at {address} within "
                         f"{minutes:g} min ({type(error).__name__}: {reason}); {hint}")


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class PeerLost(ScriptError, RuntimeError):
    """A collective operation failed: another process of the job died or stopped answering."""

    def __init__(self, error):
        reason = re.sub(r"^\[[^\]]*\]\s*", "", (str(error).splitlines() or [""])[0])  # drop a source path
        super().__init__(f"lost contact with another process of the job ({type(error).__name__}: "
                         f"{reason[:200]}); its own error, if any, is reported above")


@contextlib.contextmanager
def collective():
    """Turn the failure of a collective operation (gloo and NCCL raise RuntimeError subclasses) into
    PeerLost, told by where it happened rather than by the text of the message."""
    try:
        yield
    except RuntimeError as e:
        raise PeerLost(e) from e


def all_reduce_sum(tensor, context):
    """Sum a tensor over all ranks in place (a no-op for one process)."""
    if context.distributed:
        with collective():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(context):
    if context.distributed:
        with collective():
            dist.barrier()


def broadcast_object(obj, context, src=0):
    """Every rank gets rank `src`'s (picklable, plain) object."""
    if not context.distributed:
        return obj
    holder = [obj]
    with collective():
        dist.broadcast_object_list(holder, src=src)
    return holder[0]


def init_from_environment(device):
    """For evaluation: join the process group torchrun describes (WORLD_SIZE > 1).
    Returns (rank, world size, device, whether this call created the group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device, False
    adopt_slurm()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, device, False
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device, True
