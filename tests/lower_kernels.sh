#!/usr/bin/env bash
# Prints the exports that make torch, oneDNN and MKL use the instruction set below this CPU's own: AVX2 kernels on an
# AVX-512 CPU, SSE4.1 ones otherwise. Use: eval "$(bash tests/lower_kernels.sh)"
if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
    echo "export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2"
else
    echo "export ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2"
fi
