//! `exactly-exec-guard`: the process an `exactly` node starts between itself and each `exec`
//! command, so that the command's whole process tree dies with the node's lease. It speaks only
//! to the node, over its stdin and stdout; see `exactly_handlers::exec::guard`.

fn main() {
    std::process::exit(exactly_handlers::exec::guard::main());
}
