//! The guest linear address (GLA) of the memory operand of the instruction
//! that faulted on MMIO, decoded from its bytes.
//!
//! SVM under QEMU TCG has no decode assists and reports no GLA for a nested
//! page fault, but the #VE the TDX module raises for an EPT violation carries
//! one, and Linux 6.12's `handle_mmio` (`arch/x86/coco/tdx/tdx.c`) checks it
//! (`fault_in_kernel_space(ve->gla)`). So the emulator decodes the
//! instruction, limited to the forms `insn_decode_mmio()`
//! (`arch/x86/lib/insn-eval.c`) handles, in 64-bit mode.
//!
//! Encoding rules: Intel SDM vol. 2, sections 2.1-2.2 (prefixes, REX, ModRM,
//! SIB, RIP-relative addressing). Pure: no allocation, no panics on any input.

/// The guest state an effective address needs: the 16 GPRs in encoding order
/// (RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15), RIP of the instruction,
/// and the FS/GS bases (64-bit mode: other segment bases are 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddressContext {
    pub gprs: [u64; 16],
    pub rip: u64,
    pub fs_base: u64,
    pub gs_base: u64,
}

/// The architectural maximum length of an instruction.
const MAX_INSN_LEN: usize = 15;

/// Register number of RSI in encoding order.
const RSI: usize = 6;

/// The bytes of one instruction, read front to back without panicking.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn u8(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    /// A little-endian value of `n` (at most 8) bytes, zero-extended.
    fn le(&mut self, n: usize) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..n {
            v |= u64::from(self.u8()?) << (8 * i);
        }
        Some(v)
    }

    fn disp8(&mut self) -> Option<u64> {
        Some(self.u8()? as i8 as i64 as u64)
    }

    fn disp32(&mut self) -> Option<u64> {
        Some(self.le(4)? as u32 as i32 as i64 as u64)
    }
}

/// How the address of a memory operand is formed from a ModRM byte.
enum Ea {
    /// Base + index * scale + displacement (absent parts are 0).
    Sum(u64),
    /// RIP-relative: displacement from the end of the instruction.
    RipRelative(u64),
}

/// The address of the ModRM memory operand (cursor just past the ModRM byte),
/// or None for a register operand or missing bytes.
fn modrm_ea(c: &mut Cursor, modrm: u8, rex: u8, gprs: &[u64; 16]) -> Option<Ea> {
    let md = modrm >> 6;
    let rm = modrm & 7;
    let rex_b = usize::from(rex & 1) << 3;
    let rex_x = usize::from((rex >> 1) & 1) << 3;
    if md == 3 {
        return None;
    }
    if md == 0 && rm == 5 {
        return Some(Ea::RipRelative(c.disp32()?));
    }
    let mut sum = 0u64;
    if rm == 4 {
        let sib = c.u8()?;
        let scale = (sib >> 6) as u32;
        let index = usize::from((sib >> 3) & 7) | rex_x;
        let base = sib & 7;
        if index != 4 {
            sum = gprs[index & 15] << scale;
        }
        if base == 5 && md == 0 {
            sum = sum.wrapping_add(c.disp32()?);
        } else {
            sum = sum.wrapping_add(gprs[(usize::from(base) | rex_b) & 15]);
        }
    } else {
        sum = gprs[(usize::from(rm) | rex_b) & 15];
    }
    let disp = match md {
        1 => c.disp8()?,
        2 => c.disp32()?,
        _ => 0,
    };
    Some(Ea::Sum(sum.wrapping_add(disp)))
}

/// The linear address of the byte that faulted, from the operand's start
/// and the faulting GPA: an access that crosses into the next page faults
/// on that page (the GPA's page offset is then below the operand's), and
/// the hardware reports the address in it, which Linux's ZEROPAD fixup
/// checks (`ex_handler_zeropad`: the fault address must be the next aligned
/// word). A page never straddles more than once for these 1-8 byte accesses.
pub const fn faulting_address(operand: u64, fault_gpa: u64) -> u64 {
    let gpa_offset = fault_gpa & 0xfff;
    if gpa_offset < operand & 0xfff {
        (operand | 0xfff).wrapping_add(1) + gpa_offset
    } else {
        (operand & !0xfff) | gpa_offset
    }
}

/// The linear address of the memory operand of the 64-bit-mode instruction in
/// `bytes` (up to 15 bytes fetched at RIP; fewer if a fetch failed), or None
/// if it is not one of the MMIO-style instructions Linux's
/// `insn_decode_mmio()` handles or cannot be decoded: MOV 88/89/8A/8B (r/m),
/// MOV C6 /0 and C7 /0 (imm), MOVZX 0F B6/B7, MOVSX 0F BE/BF, MOV A0-A3
/// (moffs), and MOVS A4/A5 (the source, RSI).
///
/// Prefixes: operand-size 0x66, address-size 0x67 (32-bit addressing: the
/// effective address is truncated to 32 bits before the segment base is
/// added), FS 0x64 / GS 0x65 (their base is added), CS/DS/ES/SS 0x2E/0x3E/
/// 0x26/0x36 (ignored: base 0), REP F2/F3 and LOCK F0; then an optional REX
/// 0x40-0x4F immediately before the opcode (a REX followed by another prefix
/// is ignored, as the CPU does). The whole instruction, immediate included,
/// must be present in `bytes` and be at most 15 bytes long.
pub fn memory_operand_address(bytes: &[u8], ctx: &AddressContext) -> Option<u64> {
    let bytes = bytes.get(..MAX_INSN_LEN).unwrap_or(bytes);
    let mut c = Cursor { bytes, pos: 0 };
    let mut opsize16 = false;
    let mut addr32 = false;
    let mut seg_base = 0u64;
    let mut rex = 0u8;
    let opcode = loop {
        let b = c.u8()?;
        match b {
            0x66 => opsize16 = true,
            0x67 => addr32 = true,
            0x64 => seg_base = ctx.fs_base,
            0x65 => seg_base = ctx.gs_base,
            0x2E | 0x3E | 0x26 | 0x36 => seg_base = 0,
            0xF0 | 0xF2 | 0xF3 => {}
            0x40..=0x4F => {
                rex = b;
                continue;
            }
            _ => break b,
        }
        rex = 0;
    };
    let rex_w = rex & 8 != 0;

    // ModRM forms: 0F's second byte, then ModRM, SIB, displacement, immediate.
    let ea = match opcode {
        0x88..=0x8B | 0xC6 | 0xC7 | 0x0F => {
            let imm = match opcode {
                0x0F => {
                    if !matches!(c.u8()?, 0xB6 | 0xB7 | 0xBE | 0xBF) {
                        return None;
                    }
                    0
                }
                0xC6 => 1,
                0xC7 if opsize16 && !rex_w => 2,
                0xC7 => 4,
                _ => 0,
            };
            let modrm = c.u8()?;
            if matches!(opcode, 0xC6 | 0xC7) && (modrm >> 3) & 7 != 0 {
                return None;
            }
            let ea = modrm_ea(&mut c, modrm, rex, &ctx.gprs)?;
            c.le(imm)?;
            ea
        }
        0xA0..=0xA3 => Ea::Sum(c.le(if addr32 { 4 } else { 8 })?),
        0xA4 | 0xA5 => Ea::Sum(ctx.gprs[RSI]),
        _ => return None,
    };
    let len = c.pos as u64;
    let ea = match ea {
        Ea::Sum(v) => v,
        Ea::RipRelative(d) => ctx.rip.wrapping_add(len).wrapping_add(d),
    };
    let ea = if addr32 { ea & 0xFFFF_FFFF } else { ea };
    Some(seg_base.wrapping_add(ea))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FS: u64 = 0xFFFF_8880_0000_0000;
    const GS: u64 = 0xFFFF_8881_2345_0000;
    const RIP: u64 = 0xFFFF_FFFF_8100_0000;

    /// Register i holds 0x1000 * (i + 1) + i, except RAX (high bits set, to
    /// exercise 32-bit truncation).
    fn ctx() -> AddressContext {
        let mut gprs = [0u64; 16];
        for (i, g) in gprs.iter_mut().enumerate() {
            *g = 0x1000 * (i as u64 + 1) + i as u64;
        }
        gprs[0] = 0xFFFF_C900_0000_1000;
        AddressContext {
            gprs,
            rip: RIP,
            fs_base: FS,
            gs_base: GS,
        }
    }

    #[test]
    fn table() {
        let c = ctx();
        let r = |i: usize| c.gprs[i];
        let cases: &[(&str, &[u8], Option<u64>)] = &[
            ("mov eax, [rdi]", &[0x8b, 0x07], Some(r(7))),
            (
                "mov [rax+rbx*4+0x10], ecx",
                &[0x89, 0x4c, 0x98, 0x10],
                Some(r(0).wrapping_add(r(3) * 4).wrapping_add(0x10)),
            ),
            ("mov r8d, [r12]", &[0x45, 0x8b, 0x04, 0x24], Some(r(12))),
            (
                "mov dword [rip+0x100], 5",
                &[0xc7, 0x05, 0x00, 0x01, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00],
                Some(RIP + 10 + 0x100),
            ),
            (
                "mov word [rip-4], 5",
                &[0x66, 0xc7, 0x05, 0xfc, 0xff, 0xff, 0xff, 0x05, 0x00],
                Some(RIP + 9 - 4),
            ),
            (
                "mov byte [rip+0], 1",
                &[0xc6, 0x05, 0x00, 0x00, 0x00, 0x00, 0x01],
                Some(RIP + 7),
            ),
            (
                "mov rax, [rip+0x20]",
                &[0x48, 0x8b, 0x05, 0x20, 0x00, 0x00, 0x00],
                Some(RIP + 7 + 0x20),
            ),
            (
                "movzx eax, word [rsi-8]",
                &[0x0f, 0xb7, 0x46, 0xf8],
                Some(r(6) - 8),
            ),
            (
                "movsx eax, byte [rbp+0x80]",
                &[0x0f, 0xbe, 0x85, 0x80, 0, 0, 0],
                Some(r(5) + 0x80),
            ),
            (
                "mov gs:[0x28], rax",
                &[0x65, 0x48, 0x89, 0x04, 0x25, 0x28, 0x00, 0x00, 0x00],
                Some(GS + 0x28),
            ),
            ("mov fs:[rcx], edx", &[0x64, 0x89, 0x11], Some(FS + r(1))),
            (
                "mov ds:[rcx], edx (ignored)",
                &[0x3e, 0x89, 0x11],
                Some(r(1)),
            ),
            (
                "mov al, [moffs64]",
                &[0xa0, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11],
                Some(0x1122_3344_5566_7788),
            ),
            (
                "mov eax, [moffs32] (0x67)",
                &[0x67, 0xa1, 0x44, 0x33, 0x22, 0x11],
                Some(0x1122_3344),
            ),
            ("movsd", &[0xa5], Some(r(6))),
            ("rep movsb", &[0xf3, 0xa4], Some(r(6))),
            (
                "mov [r13+r12*8-1], al (REX.B/X)",
                &[0x47, 0x88, 0x44, 0xe5, 0xff],
                Some(r(13) + r(12) * 8 - 1),
            ),
            (
                "mov [r13], eax (mod=01 disp8 0)",
                &[0x41, 0x89, 0x45, 0x00],
                Some(r(13)),
            ),
            (
                "mov eax, [rbx*2+0x1000] (SIB no base)",
                &[0x8b, 0x04, 0x5d, 0, 0x10, 0, 0],
                Some(r(3) * 2 + 0x1000),
            ),
            (
                "mov eax, [rsp] (index 100 = none)",
                &[0x8b, 0x04, 0x24],
                Some(r(4)),
            ),
            (
                "mov eax, [rsp+r12] (REX.X index)",
                &[0x42, 0x8b, 0x04, 0x24],
                Some(r(4) + r(12)),
            ),
            (
                "mov eax, [eax] (0x67 truncates)",
                &[0x67, 0x8b, 0x00],
                Some(r(0) & 0xFFFF_FFFF),
            ),
            (
                "mov eax, [eax-1] (0x67 wraps)",
                &[0x67, 0x8b, 0x40, 0xff],
                Some((r(0) - 1) & 0xFFFF_FFFF),
            ),
            (
                "mov eax, gs:[eax] (0x67 then base)",
                &[0x65, 0x67, 0x8b, 0x00],
                Some(GS + (r(0) & 0xFFFF_FFFF)),
            ),
            ("mov eax, ecx (register form)", &[0x89, 0xc8], None),
            (
                "mov ecx, 1 (C7 /0 register form)",
                &[0xc7, 0xc1, 1, 0, 0, 0],
                None,
            ),
            ("C7 /1 (not a MOV)", &[0xc7, 0x08, 1, 0, 0, 0], None),
            ("truncated disp8", &[0x89, 0x4c, 0x98], None),
            ("truncated SIB", &[0x89, 0x04], None),
            (
                "truncated immediate",
                &[0xc7, 0x05, 0x00, 0x01, 0x00, 0x00, 0x05, 0x00],
                None,
            ),
            ("truncated moffs", &[0xa0, 1, 2, 3, 4, 5, 6, 7], None),
            ("prefixes only", &[0x66, 0x48], None),
            ("empty", &[], None),
            ("unknown opcode (lgdt)", &[0x0f, 0x01, 0x10], None),
            ("unknown opcode (add)", &[0x01, 0x07], None),
            (
                "REX then legacy prefix ignores REX",
                &[0x41, 0x66, 0x8b, 0x07],
                Some(r(7)),
            ),
        ];
        for (name, bytes, want) in cases {
            assert_eq!(memory_operand_address(bytes, &c), *want, "{name}");
        }
    }

    #[test]
    fn longer_than_15_bytes_is_rejected() {
        let mut b = [0x66u8; 16];
        b[14] = 0x8b;
        b[15] = 0x07;
        assert_eq!(memory_operand_address(&b, &ctx()), None);
        assert_eq!(memory_operand_address(&b[2..], &ctx()), Some(ctx().gprs[7]));
    }

    #[test]
    fn never_panics_on_short_sequences() {
        const ALPHABET: [u8; 24] = [
            0x00, 0x04, 0x05, 0x0f, 0x24, 0x25, 0x44, 0x4f, 0x64, 0x65, 0x66, 0x67, 0x80, 0x89,
            0x8b, 0xa0, 0xa5, 0xb7, 0xbf, 0xc6, 0xc7, 0xe5, 0xf3, 0xff,
        ];
        let mut c = ctx();
        c.gprs = [u64::MAX; 16];
        c.rip = u64::MAX;
        c.gs_base = u64::MAX;
        let mut buf = [0u8; 3];
        for len in 0..=3usize {
            let n = ALPHABET.len().pow(len as u32);
            for mut k in 0..n {
                for slot in buf.iter_mut().take(len) {
                    *slot = ALPHABET[k % ALPHABET.len()];
                    k /= ALPHABET.len();
                }
                let _ = memory_operand_address(&buf[..len], &c);
            }
        }
    }

    #[test]
    fn a_load_crossing_into_the_next_page_faults_at_that_page() {
        // load_unaligned_zeropad at page end - 3: the 8-byte load faults on
        // the next page, whose GPA offset is 0.
        let operand = 0xffff_8880_0010_0ffd;
        assert_eq!(
            faulting_address(operand, 0x8000_0020_0000),
            0xffff_8880_0010_1000
        );
        // A fault on the operand's own page keeps its address.
        assert_eq!(faulting_address(0x1234_5678, 0x9_9678), 0x1234_5678);
    }
}
