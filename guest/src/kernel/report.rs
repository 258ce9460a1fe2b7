//! The serial protocol the host harness parses:
//! `PLAN <n>`, then one `TEST <name> ok` or `TEST <name> FAILED: <why>` each,
//! `STRESS ...` counters (in a TD a second `STRESS` line with the TDCALL
//! totals), `SUMMARY passed=<n> failed=<n>`.

use bare::println;
use core::fmt;
use core::sync::atomic::{AtomicU32, Ordering};

/// Why a test failed. The message itself is formatted, without allocation,
/// into one static buffer (tests run one at a time), so the error stays small.
pub struct Failure(());

struct Message {
    text: [u8; 240],
    len: usize,
}

static MESSAGE: spin::Mutex<Message> = spin::Mutex::new(Message {
    text: [0; 240],
    len: 0,
});

impl Failure {
    pub fn new(args: fmt::Arguments<'_>) -> Failure {
        let mut message = MESSAGE.lock();
        message.len = 0;
        let _ = fmt::write(&mut *message, args);
        Failure(())
    }
}

impl fmt::Write for Message {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.text.len() - self.len;
        let take = s.len().min(room);
        self.text[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}

/// Fails the test with a message unless the condition holds.
#[macro_export]
macro_rules! ensure {
    ($condition:expr, $($message:tt)*) => {
        if !$condition {
            return Err($crate::kernel::report::Failure::new(format_args!($($message)*)));
        }
    };
}

/// What a test returns.
pub type TestResult = Result<(), Failure>;
/// A named test.
pub type Test = (&'static str, fn() -> TestResult);

static PASSED: AtomicU32 = AtomicU32::new(0);
static FAILED: AtomicU32 = AtomicU32::new(0);

pub fn plan(count: usize) {
    println!("PLAN {count}");
}

pub fn run(name: &str, test: fn() -> TestResult) {
    match test() {
        Ok(()) => {
            PASSED.fetch_add(1, Ordering::SeqCst);
            println!("TEST {name} ok");
        }
        Err(Failure(())) => {
            FAILED.fetch_add(1, Ordering::SeqCst);
            let message = MESSAGE.lock();
            let text =
                core::str::from_utf8(&message.text[..message.len]).unwrap_or("(unprintable)");
            println!("TEST {name} FAILED: {text}");
        }
    }
}

/// Prints the summary; true if nothing failed.
pub fn summary() -> bool {
    let (passed, failed) = (PASSED.load(Ordering::SeqCst), FAILED.load(Ordering::SeqCst));
    println!("SUMMARY passed={passed} failed={failed}");
    failed == 0
}
