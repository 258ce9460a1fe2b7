//! `write-seeds DIR`: writes each target's seeds into `DIR/<target>/`.

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: write-seeds DIR"));
    for seeds in fuzz::seeds::all() {
        let target = dir.join(seeds.target);
        std::fs::create_dir_all(&target).expect("create the corpus directory");
        for (name, input) in seeds.inputs {
            std::fs::write(target.join(format!("seed-{name}")), input).expect("write a seed");
        }
    }
}
