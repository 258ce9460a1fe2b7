//! Replays, without libFuzzer, every seed and every saved input under
//! `fuzz/regressions/<target>/` (each a crash a fuzzer found, kept after
//! its fix) through its target: none may fail a property any more.

use std::path::Path;

#[test]
fn seeds_pass_every_target() {
    for seeds in fuzz::seeds::all() {
        let run = fuzz::target(seeds.target).expect("a seed for an unknown target");
        assert!(!seeds.inputs.is_empty());
        for (name, input) in &seeds.inputs {
            eprintln!("{}: seed {name}", seeds.target);
            run(input);
        }
    }
}

#[test]
fn saved_crashes_pass_every_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
    let mut replayed = 0;
    for target in std::fs::read_dir(&root).expect("fuzz/regressions") {
        let target = target.unwrap().path();
        let name = target.file_name().unwrap().to_str().unwrap().to_owned();
        let run = fuzz::target(&name).unwrap_or_else(|| panic!("no target {name}"));
        for input in std::fs::read_dir(&target).unwrap() {
            let input = input.unwrap().path();
            eprintln!("{name}: {}", input.display());
            run(&std::fs::read(&input).unwrap());
            replayed += 1;
        }
    }
    assert!(
        replayed > 0,
        "no saved crash inputs under {}",
        root.display()
    );
}
