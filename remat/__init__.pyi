"""The public names of ``remat``: the one list of them.

``remat/__init__.py`` reads it at import time (``lazy_loader.attach_stub``) to load each
name on first use, and type checkers read it as the package's interface. Each name is
written once, as ``from .module import name as name`` (an explicit re-export)."""

from . import (
    models as models,
    nnx as nnx,
    policies as policies,
    step as step,
    testing as testing,
    train as train,
)
from ._analysis import (
    analyze as analyze,
)
from ._apply import (
    checkpoint as checkpoint,
    checkpoint_names as checkpoint_names,
    remat as remat,
    without_remat as without_remat,
)
from ._errors import (
    CorpusError as CorpusError,
    DumpFormatError as DumpFormatError,
    MissingCheckpointNameError as MissingCheckpointNameError,
    NeverKeptError as NeverKeptError,
    NeverKeptWarning as NeverKeptWarning,
    NoMemoryAnalysisError as NoMemoryAnalysisError,
    OffloadUnsupportedError as OffloadUnsupportedError,
    PolicyNotTextError as PolicyNotTextError,
    PolicySpecError as PolicySpecError,
    RematError as RematError,
    RematTargetError as RematTargetError,
    ScanCarryOffloadError as ScanCarryOffloadError,
    UnknownPolicyError as UnknownPolicyError,
    UnsupportedJaxModeError as UnsupportedJaxModeError,
)
from ._flax_workload import (
    linen_workload as linen_workload,
    nnx_workload as nnx_workload,
)
from ._memory import (
    PeakBuffer as PeakBuffer,
)
from ._mesh import (
    set_cpu_devices as set_cpu_devices,
)
from ._report import (
    Compute as Compute,
    HostTraffic as HostTraffic,
    Memory as Memory,
    PeakBreakdown as PeakBreakdown,
    Report as Report,
    Residuals as Residuals,
)
from ._residuals import (
    ResidualRow as ResidualRow,
)
from ._scan import (
    scan_layers as scan_layers,
)
from ._sweep import (
    SweepResult as SweepResult,
    inspect_policy as inspect_policy,
    plot_sweep as plot_sweep,
    sweep as sweep,
    train_step_setup as train_step_setup,
)
from ._targets import (
    TARGETS as TARGETS,
    Target as Target,
    target_devices as target_devices,
    target_mesh as target_mesh,
)
from ._tune import (
    SearchPoint as SearchPoint,
    TuneResult as TuneResult,
    tune as tune,
)
from ._workload import (
    Configuration as Configuration,
    TrainStep as TrainStep,
    TrainStepSetup as TrainStepSetup,
    Workload as Workload,
)
from .policies import (
    OpaquePolicy as OpaquePolicy,
    Policy as Policy,
)

__version__: str
