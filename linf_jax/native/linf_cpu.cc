// Native CPU kernels for linf_jax.ops (XLA FFI custom calls), built on first use by
// linf_jax/native/__init__.py with the machine's C++ compiler (-O3 and the -march of the chosen
// instruction set). The method they serve: docs/METHOD.md §2 (distances), §3.2 (bounds), §6
// (weight decay).
//
// This file is the library's one translation unit: it includes the kernel families, each of
// which also compiles on its own.
//   linf.cc      LinfDistFwd, LinfDistMax, LinfDistBwd: the l_inf distance and its backward pass
//   bounds.cc    LinfBounds: the interval bounds of certification
//   lp.cc        LpSum, LpBwd: the l_p distance's sum pass and backward pass
//   lp_decay.cc  LpDecay: the direction of the optimiser's l_p weight decay
//   sort.cc      SortDistFwd, SortDistMax, SortDistBwd, SortBounds: SortNet's inference neuron
//                (a weighted top K of |x - w|) and its interval bounds
//   common.h     what they share: vector types and register tiles per instruction set, the tile
//                sweep, the thread pool, padding, non-finite rows, leading (vmapped) dimensions
//   powers.h     the vector powers of lp.cc and lp_decay.cc
// One unit rather than one per family: the families share common.h and XLA's FFI header, whose
// parsing and instantiation a build per file would repeat (the CPU this costs: BENCHMARKS.md,
// "Test suite time").
#include "linf.cc"
#include "bounds.cc"
#include "lp.cc"
#include "lp_decay.cc"
#include "sort.cc"
