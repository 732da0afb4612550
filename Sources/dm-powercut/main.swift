// dm-powercut: the power-cut rig's workload and replayer (docs/reliability.md,
// scripts/powercut.sh). Runs as root in the VM rig; the tool may run programs (mkfs,
// e2fsck, dmsetup, sha256sum), the library never does.
//
//   dm-powercut workload ROOT WORK LOG_DM_NAME STATE [--sandboxes N] [--files N] [--base-mib N]
//       the agent's life on the filesystem mounted at ROOT (on the log-writes device
//       LOG_DM_NAME); sandbox mounts under WORK; what it acknowledged goes to STATE.
//   dm-powercut check LOG REPLAY_FILE REPLAY_LOOP COW_LOOP FSTYPE ROOT WORK STATE [--points N | --entry N]
//       replays LOG onto REPLAY_FILE point by point and checks each point; exit 1 if any fails.
//       Points start at the workload's first mark (the host filesystem made); an entry
//       before it is refused (exit 1, saying so).
//   dm-powercut agent BASE NAME STORE
//       (for the workload) creates one sandbox, prints READY, waits to be SIGKILLed.

import Logging
import ToolSupport

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

func fail(_ message: String, status: Int32) -> Never {
    emit("dm-powercut: \(message)\n", to: STDERR_FILENO)
    exit(status)
}

/// The positional arguments and the `--name N` options of a command line.
func parse(_ arguments: ArraySlice<String>, options: [String: Int]) -> ([String], [String: Int]) {
    var positional: [String] = []
    var values = options
    var rest = arguments
    while let argument = rest.popFirst() {
        if argument.hasPrefix("--") {
            let key = String(argument.dropFirst(2))
            guard values[key] != nil, let text = rest.popFirst(), let value = Int(text), value > 0 || key == "entry"
            else {
                fail("bad option \(argument)", status: 2)
            }
            values[key] = value
        } else {
            positional.append(argument)
        }
    }
    return (positional, values)
}

// The library's logs: warnings and worse, on stderr (its info lines, one per device, would
// drown the rig's own output).
LoggingSystem.bootstrap { label in
    var handler = StreamLogHandler.standardError(label: label)
    handler.logLevel = .warning
    return handler
}

let arguments = CommandLine.arguments.dropFirst()
switch arguments.first {
case "workload":
    let (positional, options) = parse(arguments.dropFirst(), options: ["sandboxes": 3, "files": 4, "base-mib": 16])
    guard positional.count == 4 else { fail("usage: workload ROOT WORK LOG_DM_NAME STATE [options]", status: 2) }
    var workload = Workload(
        root: positional[0], work: positional[1], logDevice: positional[2],
        sandboxCount: options["sandboxes"]!, filesPerSandbox: options["files"]!, baseMiB: options["base-mib"]!)
    do { try workload.run(statePath: positional[3]) } catch { fail("workload: \(error)", status: 1) }
    emit("dm-powercut: workload done\n", to: STDOUT_FILENO)
case "check":
    let (positional, options) = parse(arguments.dropFirst(), options: ["points": 100, "entry": -1])
    guard positional.count == 8 else {
        fail(
            "usage: check LOG REPLAY_FILE REPLAY_LOOP COW_LOOP FSTYPE ROOT WORK STATE [--points N | --entry N]",
            status: 2)
    }
    do {
        let log = try WriteLog(path: positional[0])
        let state = try readText(positional[7]).split(separator: "\n").map { line throws(PowercutError) in
            guard let event = StateEvent(line: line) else { throw PowercutError("state file: bad line \(line)") }
            return event
        }
        let checker = Checker(
            log: log, replayFile: positional[1], replayLoop: positional[2], cowLoop: positional[3],
            fileSystem: positional[4], root: positional[5], work: positional[6], state: state)
        // --entry N: that one point (a flush or write entry, or a mark) instead of a choice.
        let entry = options["entry"]!
        let points =
            entry >= 0
            ? [CheckPoint(entry: entry, kind: "entry \(entry)")] : checker.choosePoints(total: options["points"]!)
        let failures = try checker.run(points: points)
        exit(failures == 0 ? 0 : 1)
    } catch { fail("check: \(error)", status: 1) }
case "agent":
    guard arguments.count == 4 else { fail("usage: agent BASE NAME STORE", status: 2) }
    let values = Array(arguments.dropFirst())
    runKilledAgent(base: values[0], name: values[1], store: values[2])
default:
    fail("usage: dm-powercut (workload|check|agent) ...; see the source's header", status: 2)
}
