//! run-guest's command line (in the library so it is unit-tested):
//!
//! ```text
//! run-guest [CPUS] [--td [EMULATOR OPTION...]] [--kernel FILE] [--initrd FILE]
//!           [--timeout SECONDS] [-- KERNEL COMMAND LINE...]
//! ```
//!
//! Without `--kernel`, our guest (built if need be); with `--td`, the kernel
//! runs as a TD under the TDX-module emulator. Every word after `--` is the
//! kernel's command line.

use crate::MAX_TD_VCPUS;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The usage line printed with every command-line error.
pub const USAGE: &str = "usage: run-guest [CPUS] [--td [EMULATOR OPTION...]] [--kernel FILE] \
                         [--initrd FILE] [--timeout SECONDS] [-- KERNEL COMMAND LINE...]";

/// vCPUs when none are given (`make run` and `make run-td`).
pub const DEFAULT_CPUS: u32 = 4;
/// How long a run may take unless `--timeout` says otherwise: the longest
/// runs here (the TD stress, Linux as a TD) take minutes under TCG.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

/// What run-guest was asked to do.
#[derive(Debug, PartialEq, Eq)]
pub struct Args {
    pub cpus: u32,
    /// `Some(emulator options)` with `--td`.
    pub td: Option<Vec<String>>,
    /// `None`: our guest.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// All words after `--`, joined by spaces; `None` without `--`.
    pub append: Option<String>,
    pub timeout: Duration,
}

/// Why run-guest will not start QEMU.
#[derive(Debug, PartialEq, Eq)]
pub enum CliError {
    /// A flag that takes a value came last.
    MissingValue(&'static str),
    /// A `--flag` run-guest does not know.
    UnknownFlag(String),
    /// The same flag or the CPU count twice.
    Repeated(String),
    /// A CPU count or timeout that is not a positive number.
    BadNumber { what: &'static str, text: String },
    /// More vCPUs than the emulator runs.
    TooManyVcpus { cpus: u32, max: u32 },
    /// An emulator option outside `--td` (a word before `--` that is
    /// neither a flag nor the CPU count).
    StrayWord(String),
    /// A kernel or initrd file that cannot be read.
    File {
        flag: &'static str,
        path: PathBuf,
        why: String,
    },
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingValue(flag) => write!(f, "{flag} needs a value"),
            Self::UnknownFlag(flag) => write!(f, "unknown flag {flag}"),
            Self::Repeated(what) => write!(f, "{what} given twice"),
            Self::BadNumber { what, text } => {
                write!(f, "{what} {text:?} is not a positive whole number")
            }
            Self::TooManyVcpus { cpus, max } => write!(
                f,
                "{cpus} vCPUs: the TDX-module emulator runs at most {max}"
            ),
            Self::StrayWord(word) => write!(
                f,
                "{word:?}: emulator options go after --td, kernel arguments after --"
            ),
            Self::File { flag, path, why } => write!(f, "{flag} {}: {why}", path.display()),
        }
    }
}

impl std::error::Error for CliError {}

fn positive(what: &'static str, text: &str) -> Result<u32, CliError> {
    match text.parse::<u32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(CliError::BadNumber {
            what,
            text: text.to_string(),
        }),
    }
}

/// Parses run-guest's arguments (without the program name). Checks only
/// the words; [`check_files`] checks the files they name.
pub fn parse(args: &[String]) -> Result<Args, CliError> {
    let (ours, append) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], Some(args[i + 1..].join(" "))),
        None => (args, None),
    };
    let mut cpus = None;
    let mut td: Option<Vec<String>> = None;
    let mut kernel = None;
    let mut initrd = None;
    let mut timeout = None;
    let mut words = ours.iter();
    while let Some(word) = words.next() {
        let mut value =
            |flag: &'static str| words.next().cloned().ok_or(CliError::MissingValue(flag));
        match word.as_str() {
            "--td" if td.is_some() => return Err(CliError::Repeated("--td".into())),
            "--td" => td = Some(Vec::new()),
            "--kernel" if kernel.is_some() => return Err(CliError::Repeated(word.clone())),
            "--kernel" => kernel = Some(PathBuf::from(value("--kernel")?)),
            "--initrd" if initrd.is_some() => return Err(CliError::Repeated(word.clone())),
            "--initrd" => initrd = Some(PathBuf::from(value("--initrd")?)),
            "--timeout" if timeout.is_some() => return Err(CliError::Repeated(word.clone())),
            "--timeout" => {
                let seconds = positive("timeout", &value("--timeout")?)?;
                timeout = Some(Duration::from_secs(seconds.into()));
            }
            flag if flag.starts_with("--") => return Err(CliError::UnknownFlag(flag.into())),
            // A bare number is the CPU count wherever it stands (no emulator
            // option is a bare number).
            number if number.bytes().all(|b| b.is_ascii_digit()) => {
                if cpus.is_some() {
                    return Err(CliError::Repeated("the CPU count".into()));
                }
                cpus = Some(positive("CPU count", number)?);
            }
            option => match &mut td {
                Some(options) => options.push(option.to_string()),
                None => return Err(CliError::StrayWord(option.into())),
            },
        }
    }
    let cpus = cpus.unwrap_or(DEFAULT_CPUS);
    if td.is_some() && cpus > MAX_TD_VCPUS {
        return Err(CliError::TooManyVcpus {
            cpus,
            max: MAX_TD_VCPUS,
        });
    }
    Ok(Args {
        cpus,
        td,
        kernel,
        initrd,
        append,
        timeout: timeout.unwrap_or(DEFAULT_TIMEOUT),
    })
}

/// The kernel and initrd files exist and are readable regular files, so a
/// typo ends here with the file's name, not inside QEMU or the emulator.
pub fn check_files(args: &Args) -> Result<(), CliError> {
    let named = [("--kernel", &args.kernel), ("--initrd", &args.initrd)];
    for (flag, path) in named {
        if let Some(path) = path {
            check_file(flag, path)?;
        }
    }
    Ok(())
}

fn check_file(flag: &'static str, path: &Path) -> Result<(), CliError> {
    let error = |why: String| CliError::File {
        flag,
        path: path.to_path_buf(),
        why,
    };
    let metadata = std::fs::metadata(path).map_err(|e| error(e.to_string()))?;
    if !metadata.is_file() {
        return Err(error("not a regular file".into()));
    }
    std::fs::File::open(path).map_err(|e| error(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn the_make_targets_parse_as_before() {
        let run = parse(&args("4")).unwrap();
        assert_eq!((run.cpus, &run.td, &run.append), (4, &None, &None));
        let td = parse(&args("4 --td strict -- stress-rounds=300")).unwrap();
        assert_eq!(td.td, Some(vec!["strict".to_string()]));
        assert_eq!(td.append.as_deref(), Some("stress-rounds=300"));
        assert_eq!(parse(&[]).unwrap().cpus, DEFAULT_CPUS);
    }

    #[test]
    fn every_word_after_the_separator_reaches_the_kernel() {
        let a = parse(&args(
            "4 --td memory=1024 wrong-state=ve --kernel bz --initrd fs -- console=ttyS0 quiet -- x",
        ))
        .unwrap();
        assert_eq!(a.append.as_deref(), Some("console=ttyS0 quiet -- x"));
        assert_eq!(
            a.td,
            Some(vec![
                "memory=1024".to_string(),
                "wrong-state=ve".to_string()
            ])
        );
        assert_eq!(a.kernel, Some(PathBuf::from("bz")));
        assert_eq!(a.initrd, Some(PathBuf::from("fs")));
        // An empty command line is still a command line.
        assert_eq!(parse(&args("--td --")).unwrap().append.as_deref(), Some(""));
    }

    #[test]
    fn flags_may_come_in_any_order() {
        let a = parse(&args("--kernel bz --td strict 2 --timeout 60")).unwrap();
        assert_eq!(a.cpus, 2);
        assert_eq!(a.td, Some(vec!["strict".to_string()]));
        assert_eq!(a.timeout, Duration::from_secs(60));
    }

    #[test]
    fn more_vcpus_than_the_emulator_runs_are_refused() {
        assert_eq!(
            parse(&args("17 --td")),
            Err(CliError::TooManyVcpus { cpus: 17, max: 16 })
        );
        assert_eq!(
            parse(&args("17 --td")).unwrap_err().to_string(),
            "17 vCPUs: the TDX-module emulator runs at most 16"
        );
        assert!(parse(&args("16 --td")).is_ok());
        // Plain QEMU has no such limit.
        assert!(parse(&args("17")).is_ok());
    }

    #[test]
    fn bad_words_are_refused() {
        assert_eq!(
            parse(&args("0")),
            Err(CliError::BadNumber {
                what: "CPU count",
                text: "0".into()
            })
        );
        assert_eq!(
            parse(&args("--kernel")),
            Err(CliError::MissingValue("--kernel"))
        );
        assert_eq!(
            parse(&args("--memory 5")),
            Err(CliError::UnknownFlag("--memory".into()))
        );
        assert_eq!(
            parse(&args("strict")),
            Err(CliError::StrayWord("strict".into()))
        );
        assert_eq!(
            parse(&args("2 4")),
            Err(CliError::Repeated("the CPU count".into()))
        );
        assert_eq!(
            parse(&args("--td --td")),
            Err(CliError::Repeated("--td".into()))
        );
        assert!(matches!(
            parse(&args("--timeout soon")),
            Err(CliError::BadNumber {
                what: "timeout",
                ..
            })
        ));
    }

    #[test]
    fn missing_files_are_named() {
        let a = parse(&args("--td --kernel /nonexistent/bzImage")).unwrap();
        let why = check_files(&a).unwrap_err().to_string();
        assert!(why.starts_with("--kernel /nonexistent/bzImage: "), "{why}");
        let a = parse(&args("--td --initrd /")).unwrap();
        assert_eq!(
            check_files(&a).unwrap_err().to_string(),
            "--initrd /: not a regular file"
        );
        let this_file = concat!(env!("CARGO_MANIFEST_DIR"), "/src/cli.rs");
        let a = parse(&["--kernel".to_string(), this_file.to_string()]).unwrap();
        assert_eq!(check_files(&a), Ok(()));
    }
}
