// Stands in for the CUDA header of this name when csrc/cuda is built for the host emulation: what the
// sources use of it comes from tests/cuda_emulation/emulation.h, force-included before them.
#pragma once
