//! Events injected into the TD, in SVM's EVENTINJ / EXITINTINFO encoding
//! (AMD APM vol. 2, 15.20: vector in bits 7:0, type in 10:8, error-code
//! valid in 11, valid in 31, error code in 63:32), and what to do when an
//! exit interrupted the delivery of one event and wants to inject another.

/// Event types.
const TYPE_INTERRUPT: u64 = 0;
const TYPE_EXCEPTION: u64 = 3;
const VALID: u64 = 1 << 31;
const ERROR_CODE_VALID: u64 = 1 << 11;

/// One event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event(u64);

impl Event {
    /// An exception, with its error code for vectors that push one.
    pub const fn exception(vector: u8, error_code: Option<u32>) -> Event {
        let mut raw = vector as u64 | (TYPE_EXCEPTION << 8) | VALID;
        if let Some(code) = error_code {
            raw |= ERROR_CODE_VALID | ((code as u64) << 32);
        }
        Event(raw)
    }

    /// An external interrupt.
    pub const fn interrupt(vector: u8) -> Event {
        Event(vector as u64 | (TYPE_INTERRUPT << 8) | VALID)
    }

    /// The event whose delivery an exit interrupted (EXITINTINFO), if any.
    pub const fn from_exit_int_info(raw: u64) -> Option<Event> {
        if raw & VALID != 0 {
            Some(Event(raw))
        } else {
            None
        }
    }

    pub const fn to_event_injection(self) -> u64 {
        self.0
    }

    pub const fn vector(self) -> u8 {
        self.0 as u8
    }

    const fn kind(self) -> u64 {
        (self.0 >> 8) & 7
    }
}

/// What the exit handler does with the two.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Merged {
    /// Injected on the next VMRUN.
    pub inject: Option<Event>,
    /// An interrupt vector that must become pending again.
    pub requeue: Option<u8>,
}

/// `interrupted`: the event in EXITINTINFO; `new`: what the exit's handler
/// wants to inject. Only one event can be injected; an external interrupt
/// set aside is put back in the virtual APIC's pending set, never dropped
/// (a nested fault taken while delivering an interrupt used to lose it when
/// the fault's #VE was injected in its place). An interrupted exception is
/// re-raised by re-executing the instruction, so the new event wins.
pub fn merge(interrupted: Option<Event>, new: Option<Event>) -> Merged {
    match (interrupted, new) {
        (None, new) => Merged {
            inject: new,
            requeue: None,
        },
        (Some(old), None) => Merged {
            inject: Some(old),
            requeue: None,
        },
        (Some(old), Some(new)) if old.kind() == TYPE_INTERRUPT => Merged {
            inject: Some(new),
            requeue: Some(old.vector()),
        },
        // An NMI cannot be re-queued as a vector; the TD here never gets
        // one (the VMM delivers none), and the fault's event goes first.
        (Some(_), Some(new)) => Merged {
            inject: Some(new),
            requeue: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VE: Event = Event::exception(20, None);

    #[test]
    fn an_interrupt_interrupted_by_a_nested_fault_is_requeued_not_lost() {
        let timer = Event::interrupt(0xec);
        let merged = merge(Some(timer), Some(VE));
        assert_eq!(merged.inject, Some(VE));
        assert_eq!(merged.requeue, Some(0xec));
    }

    #[test]
    fn an_interrupted_event_alone_is_delivered_again() {
        let timer = Event::interrupt(0xec);
        assert_eq!(
            merge(Some(timer), None),
            Merged {
                inject: Some(timer),
                requeue: None
            }
        );
        assert_eq!(merge(None, Some(VE)).inject, Some(VE));
        assert_eq!(merge(None, None).inject, None);
    }

    #[test]
    fn an_interrupted_exception_gives_way_to_the_new_event() {
        let page_fault = Event::exception(14, Some(2));
        assert_eq!(
            merge(Some(page_fault), Some(VE)),
            Merged {
                inject: Some(VE),
                requeue: None
            }
        );
    }

    #[test]
    fn encoding_matches_svm() {
        assert_eq!(
            Event::exception(13, Some(0)).to_event_injection(),
            0x8000_0b0d
        );
        assert_eq!(Event::exception(6, None).to_event_injection(), 0x8000_0306);
        assert_eq!(Event::interrupt(0xfd).to_event_injection(), 0x8000_00fd);
        assert_eq!(Event::from_exit_int_info(0x0000_00ec), None);
        assert_eq!(
            Event::from_exit_int_info(0x8000_00ec).map(Event::vector),
            Some(0xec)
        );
    }
}
