//! The GHCB MSR protocol (MSR 0xC001_0130): a request in the MSR, VMGEXIT,
//! the response in the MSR. GHCBInfo is bits 11:0, GHCBData bits 63:12
//! (GHCB specification; Linux `sev-common.h`). It works before any GHCB page
//! exists, one exchange at a time.

/// The GHCB MSR.
pub const MSR_GHCB: u32 = 0xc001_0130;

/// Request and response codes (GHCBInfo).
pub mod code {
    /// SEV information request / response.
    pub const SEV_INFO_REQ: u64 = 0x002;
    /// SEV information response.
    pub const SEV_INFO_RESP: u64 = 0x001;
    /// Register the GHCB page's GPA.
    pub const REGISTER_GHCB_REQ: u64 = 0x012;
    /// Its response (echoes the GFN).
    pub const REGISTER_GHCB_RESP: u64 = 0x013;
    /// Page state change, one 4K page.
    pub const PSC_REQ: u64 = 0x014;
    /// Its response (error in bits 63:32).
    pub const PSC_RESP: u64 = 0x015;
    /// Hypervisor features request.
    pub const HV_FEATURES_REQ: u64 = 0x080;
    /// Hypervisor features response (bitmap in bits 63:12).
    pub const HV_FEATURES_RESP: u64 = 0x081;
    /// Termination request (no response).
    pub const TERMINATE_REQ: u64 = 0x100;
}

/// Hypervisor feature bits (HV features response, bits 63:12 shifted down).
pub mod hv_feature {
    /// SEV-SNP is supported.
    pub const SNP: u64 = 1 << 0;
    /// AP creation (NAE 0x8000_0013) is supported.
    pub const AP_CREATION: u64 = 1 << 1;
}

/// Page state change operations (request bits 55:52; also the GHCB-page
/// PSC entries' operation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum PageOp {
    /// Assign the page to the guest (private; unvalidated until PVALIDATE).
    Private = 1,
    /// Give the page to the hypervisor (shared).
    Shared = 2,
}

/// One GHCB MSR exchange: write `request` to the MSR, VMGEXIT, return what
/// the MSR holds then. The kernel implements it (WRMSR, `rep vmmcall`,
/// RDMSR, with interrupts off so no #VC handler changes the MSR between);
/// host tests use [`crate::sim`]. When a GHCB page is registered, the
/// implementation must write its GPA back to the MSR after reading the
/// response (as Linux does after an MSR-protocol request), or the next
/// GHCB NAE reaches the hypervisor as an unknown MSR request.
pub trait GhcbMsr {
    /// The exchange.
    fn exchange(&self, request: u64) -> u64;
}

impl<T: GhcbMsr + ?Sized> GhcbMsr for &T {
    fn exchange(&self, request: u64) -> u64 {
        (**self).exchange(request)
    }
}

/// An MSR-protocol answer the guest must refuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrError {
    /// The response code (bits 11:0) is not the one the request calls for.
    WrongResponse {
        /// The request's code.
        request: u64,
        /// The whole response.
        response: u64,
    },
    /// The hypervisor reported an error (PSC: bits 63:32 non-zero).
    Refused {
        /// The whole response.
        response: u64,
    },
    /// A GFN does not fit the request's field (40 bits).
    GfnTooLarge(u64),
    /// The SEV information's C-bit is outside the address field, or its
    /// protocol range excludes version 2, which SNP needs.
    BadSevInfo {
        /// The whole response.
        response: u64,
    },
}

fn checked(request: u64, response: u64, want: u64) -> Result<u64, MsrError> {
    if response & 0xfff != want {
        return Err(MsrError::WrongResponse {
            request: request & 0xfff,
            response,
        });
    }
    Ok(response >> 12)
}

/// The SEV information response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SevInfo {
    /// Highest GHCB protocol version the hypervisor supports.
    pub max_protocol: u16,
    /// Lowest.
    pub min_protocol: u16,
    /// The C-bit position.
    pub c_bit: u8,
}

/// SEV information (0x002 -> 0x001): bits 63:48 max protocol, 47:32 min,
/// 31:24 C-bit. Refused unless protocol 2 (SNP) is in range and the C-bit
/// lies in the address field.
pub fn sev_info(msr: &impl GhcbMsr) -> Result<SevInfo, MsrError> {
    let response = msr.exchange(code::SEV_INFO_REQ);
    checked(code::SEV_INFO_REQ, response, code::SEV_INFO_RESP)?;
    let info = SevInfo {
        max_protocol: (response >> 48) as u16,
        min_protocol: (response >> 32) as u16,
        c_bit: (response >> 24) as u8,
    };
    if !(info.min_protocol..=info.max_protocol).contains(&2) || !(12..=51).contains(&info.c_bit) {
        return Err(MsrError::BadSevInfo { response });
    }
    Ok(info)
}

/// Hypervisor features (0x080 -> 0x081): the bitmap of [`hv_feature`].
pub fn hv_features(msr: &impl GhcbMsr) -> Result<u64, MsrError> {
    let response = msr.exchange(code::HV_FEATURES_REQ);
    checked(code::HV_FEATURES_REQ, response, code::HV_FEATURES_RESP)
}

/// Registers the GHCB page at `gpa` (page-aligned, shared): 0x012 with the
/// GFN -> 0x013 echoing it.
pub fn register_ghcb(msr: &impl GhcbMsr, gpa: u64) -> Result<(), MsrError> {
    let gfn = gpa >> 12;
    if gfn >> 40 != 0 {
        return Err(MsrError::GfnTooLarge(gfn));
    }
    let request = (gfn << 12) | code::REGISTER_GHCB_REQ;
    let response = msr.exchange(request);
    if checked(request, response, code::REGISTER_GHCB_RESP)? != gfn {
        return Err(MsrError::Refused { response });
    }
    Ok(())
}

/// Page state change of the one 4K page `gfn` (0x014: op in 55:52, GFN in
/// 51:12 -> 0x015 with the error in 63:32, zero for success).
pub fn page_state_change(msr: &impl GhcbMsr, gfn: u64, op: PageOp) -> Result<(), MsrError> {
    if gfn >> 40 != 0 {
        return Err(MsrError::GfnTooLarge(gfn));
    }
    let request = ((op as u64) << 52) | (gfn << 12) | code::PSC_REQ;
    let response = msr.exchange(request);
    checked(request, response, code::PSC_RESP)?;
    if response >> 32 != 0 {
        return Err(MsrError::Refused { response });
    }
    Ok(())
}

/// Asks the hypervisor to terminate the guest (0x100: reason set in 15:12,
/// reason code in 23:16). A hypervisor that returns leaves the stopping to
/// the caller.
pub fn terminate(msr: &impl GhcbMsr, reason_set: u8, reason: u8) {
    let request =
        (u64::from(reason) << 16) | (u64::from(reason_set & 0xf) << 12) | code::TERMINATE_REQ;
    msr.exchange(request);
}
