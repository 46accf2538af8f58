"""The job spec: typed, frozen sections with a description and a default per field.

YAML and ``key=value`` overrides only fill these models. Every problem in a spec
(unknown keys, bad values, sections that disagree) is collected and raised once as a
``SpecError`` before anything starts. The package splits along those lines:

- ``sections``: the models, and the keys a search may sample and PBT may change;
- ``errors``: ``Problem`` and ``SpecError``;
- ``checks``: what must hold across sections;
- ``loading``: YAML, files and overrides into a checked ``JobSpec``.

Import from here; the modules are how the package is kept, not its interface.
"""

from tune_jobs.spec.checks import budget_in, extreme
from tune_jobs.spec.errors import MISSING, Problem, SpecError
from tune_jobs.spec.loading import (
    apply_overrides,
    load_spec,
    load_spec_text,
    parse_override,
    parse_spec,
)
from tune_jobs.spec.sections import (
    ADAPTER_MUTABLE,
    ADAPTER_SEARCHABLE,
    DISTRIBUTIONS,
    MUTABLE,
    SEARCHABLE,
    SECTIONS,
    AdapterSpec,
    BudgetSpec,
    DataSpec,
    DeepSpeedSpec,
    DistributedSpec,
    JobSpec,
    LrSchedulerType,
    ModelSpec,
    ReevaluateSpec,
    ResourcesSpec,
    RetrainSpec,
    RunSpec,
    SchedulerSpec,
    SearchSpec,
    SmokeSpec,
    TrainingSpec,
    adapter_overrides,
)

__all__ = [
    "ADAPTER_MUTABLE",
    "ADAPTER_SEARCHABLE",
    "DISTRIBUTIONS",
    "MISSING",
    "MUTABLE",
    "SEARCHABLE",
    "SECTIONS",
    "AdapterSpec",
    "BudgetSpec",
    "ReevaluateSpec",
    "DataSpec",
    "DeepSpeedSpec",
    "DistributedSpec",
    "JobSpec",
    "LrSchedulerType",
    "ModelSpec",
    "Problem",
    "ResourcesSpec",
    "RetrainSpec",
    "RunSpec",
    "SchedulerSpec",
    "SearchSpec",
    "SmokeSpec",
    "SpecError",
    "TrainingSpec",
    "adapter_overrides",
    "apply_overrides",
    "budget_in",
    "extreme",
    "load_spec",
    "load_spec_text",
    "parse_override",
    "parse_spec",
]
