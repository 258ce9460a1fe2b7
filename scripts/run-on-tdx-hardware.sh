#!/usr/bin/env bash
# UNTESTED: no TDX hardware was available to this project. These are the steps to run the
# guest kernel as a real TD; the emulator (docs/tdx-emulator.md) is what CI runs instead.
#
# Needs: a host with TDX enabled in the BIOS and the kernel (kvm_intel.tdx=1), QEMU >= 10.1,
# a TD firmware (TDVF, i.e. OVMF built for TDX) or td-shim to start a bare ELF payload.
# The guest must boot from TD firmware, not PVH: with td-shim the payload is our ELF:
#   td-shim-ld ResetVector.bin td-shim -p target/x86_64-unknown-none/release/guest -o image.bin
set -euo pipefail

image=${1:?usage: $0 TD-IMAGE.bin [CPUS]}
cpus=${2:-4}

# guest_memfd backs private memory automatically; pflash is refused for TDs, so the
# firmware image goes in -bios.
exec qemu-system-x86_64 \
    -accel kvm -cpu host \
    -object tdx-guest,id=tdx0 \
    -machine q35,kernel-irqchip=split,confidential-guest-support=tdx0 \
    -smp "$cpus" -m 1G \
    -bios "$image" \
    -nodefaults -nographic -serial stdio -monitor none \
    -device isa-debug-exit,iobase=0xf4,iosize=4
