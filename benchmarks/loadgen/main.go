// Command snaplearn-loadgen is a load generator for image classification servers, closed loop or
// open loop, gRPC or HTTP: a native drop-in replacement for snaplearn_bench.pyloadgen, with the
// same flags, the same semantics and the same one-line JSON result. It exists because the
// benchmark machine has two cores and the Python generator spends a good part of one of them
// (and starts open-loop requests late at a few thousand per second), so it measured itself.
//
//	snaplearn-loadgen --target 127.0.0.1:50051 --photos /tmp/photos closed --concurrency 64
//	snaplearn-loadgen --target 127.0.0.1:50051 --photos /tmp/photos --seconds 10 open --rate 1000
//	snaplearn-loadgen --target http://127.0.0.1:8000/predict --protocol http --photos DIR closed
//	snaplearn-loadgen --target 127.0.0.1:8001 --protocol oip --model worksheet-topics --photos DIR closed
//
// Global flags come before the mode, mode flags after it:
//
//	--target      host:port (grpc) or URL (http); required
//	--protocol    grpc (snaplearn.vision.v1 Classify), http (POST {"image": base64} JSON) or
//	              oip (Open Inference Protocol ModelInfer, the photo as BYTES input IMAGE: our
//	              server and NVIDIA Triton)
//	--model       the model a ModelInfer names (oip; required there)
//	--seconds     measurement window (default 15)
//	--warmup      seconds before the window (default 3)
//	--timeout     per-request deadline, seconds (default 10)
//	--photos      directory of *.jpg payloads, all loaded, sorted by name, used round-robin;
//	              required (pyloadgen.py renders them: see its photos())
//	closed --concurrency N   N callers, each sending its next request when the previous answers
//	open --rate R            request n starts at start + n/R whatever happens to earlier ones
//
// Only the requests started inside [warmup, warmup+seconds) count, and the generator waits for
// all their answers (at most timeout+5 s in open loop). It prints one JSON object with the
// fields of pyloadgen.py's LoadResult, in its order; missing values are the token NaN, which
// Python's json.loads accepts. send_lag_p99_ms (open loop) is how late requests started
// against the schedule, measured when the request's goroutine begins; generator_cpu_cores is
// this process's user+system CPU over its whole run, in cores.
//
// GOMAXPROCS is at most 2 unless the GOMAXPROCS environment variable says otherwise.
//
// Build: cd clients/go && go build -o bin/snaplearn-loadgen ./cmd/snaplearn-loadgen
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"syscall"
	"time"
)

type options struct {
	target      string
	protocol    string
	model       string
	seconds     float64
	warmup      float64
	timeout     float64
	photos      string
	connections int
	mode        string
	concurrency int
	rate        float64
}

func main() {
	if os.Getenv("GOMAXPROCS") == "" && runtime.GOMAXPROCS(0) > 2 {
		runtime.GOMAXPROCS(2)
	}
	wall := time.Now()
	opts, err := parseArgs(os.Args[1:], os.Stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "snaplearn-loadgen:", err)
		os.Exit(2)
	}
	images, err := loadPhotos(opts.photos)
	if err != nil {
		fmt.Fprintln(os.Stderr, "snaplearn-loadgen:", err)
		os.Exit(1)
	}
	result, err := run(opts, images)
	if err != nil {
		fmt.Fprintln(os.Stderr, "snaplearn-loadgen:", err)
		os.Exit(1)
	}
	result.generatorCPUCores = cpuSeconds() / time.Since(wall).Seconds()
	os.Stdout.Write(result.json())
}

// parseArgs mirrors pyloadgen.py's argparse: global flags, then the mode, then its flags.
func parseArgs(args []string, stderr io.Writer) (options, error) {
	var o options
	global := flag.NewFlagSet("snaplearn-loadgen", flag.ContinueOnError)
	global.SetOutput(stderr)
	global.StringVar(&o.target, "target", "", "host:port (grpc) or URL (http)")
	global.StringVar(&o.protocol, "protocol", "grpc", "grpc, http or oip")
	global.StringVar(&o.model, "model", "", "model name for ModelInfer (oip)")
	global.Float64Var(&o.seconds, "seconds", 15, "measurement window, seconds")
	global.Float64Var(&o.warmup, "warmup", 3, "warm-up before the window, seconds")
	global.Float64Var(&o.timeout, "timeout", 10, "per-request deadline, seconds")
	global.StringVar(&o.photos, "photos", "", "directory of *.jpg payloads (required)")
	global.IntVar(&o.connections, "connections", 4, "gRPC connections the calls are spread over")
	global.Usage = func() {
		fmt.Fprintln(stderr, "usage: snaplearn-loadgen --target T --photos DIR [--protocol grpc|http|oip] [--model M] [--seconds S] [--warmup S] [--timeout S] [--connections N]")
		fmt.Fprintln(stderr, "                         (closed [--concurrency N] | open --rate R)")
		global.PrintDefaults()
	}
	if err := global.Parse(args); err != nil {
		return o, err
	}
	switch {
	case o.target == "":
		return o, errors.New("--target is required")
	case o.photos == "":
		return o, errors.New("--photos is required")
	case o.protocol != "grpc" && o.protocol != "http" && o.protocol != "oip":
		return o, fmt.Errorf("--protocol: %q is not grpc, http or oip", o.protocol)
	case o.protocol == "oip" && o.model == "":
		return o, errors.New("--protocol oip needs --model (ModelInfer names its model)")
	case o.connections < 1:
		return o, errors.New("--connections must be >= 1")
	case !(o.seconds > 0) || !(o.warmup >= 0) || !(o.timeout > 0):
		return o, errors.New("--seconds and --timeout must be > 0, --warmup >= 0")
	case global.NArg() == 0:
		return o, errors.New("a mode is required: closed or open")
	}
	o.mode = global.Arg(0)
	mode := flag.NewFlagSet(o.mode, flag.ContinueOnError)
	mode.SetOutput(stderr)
	switch o.mode {
	case "closed":
		mode.IntVar(&o.concurrency, "concurrency", 64, "concurrent callers")
	case "open":
		mode.Float64Var(&o.rate, "rate", 0, "requests per second (required)")
	default:
		return o, fmt.Errorf("mode %q is not closed or open", o.mode)
	}
	if err := mode.Parse(global.Args()[1:]); err != nil {
		return o, err
	}
	if mode.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments: %s", strings.Join(mode.Args(), " "))
	}
	if o.mode == "closed" && o.concurrency < 1 {
		return o, errors.New("--concurrency must be >= 1")
	}
	if o.mode == "open" && !(o.rate > 0) {
		return o, errors.New("open: --rate is required and must be > 0")
	}
	return o, nil
}

func loadPhotos(dir string) ([][]byte, error) {
	paths, err := filepath.Glob(filepath.Join(dir, "*.jpg"))
	if err != nil {
		return nil, err
	}
	if len(paths) == 0 {
		return nil, fmt.Errorf("no *.jpg in %s", dir)
	}
	sort.Strings(paths)
	images := make([][]byte, len(paths))
	for i, path := range paths {
		if images[i], err = os.ReadFile(path); err != nil {
			return nil, err
		}
	}
	return images, nil
}

func run(o options, images [][]byte) (*loadResult, error) {
	var c caller
	var err error
	switch o.protocol {
	case "grpc":
		c, err = newGRPCCaller(o.target, o.connections, images)
	case "oip":
		c, err = newOIPCaller(o.target, o.model, o.connections, images)
	default:
		connections := 512
		if o.mode == "closed" {
			connections = o.concurrency
		}
		c = newHTTPCaller(o.target, connections, images)
	}
	if err != nil {
		return nil, err
	}
	defer c.close()
	warmup, window, timeout := seconds(o.warmup), seconds(o.seconds), seconds(o.timeout)
	if o.mode == "closed" {
		return closedLoop(c, len(images), o.concurrency, warmup, window, timeout), nil
	}
	return openLoop(c, len(images), o.rate, warmup, window, timeout), nil
}

func seconds(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }

func cpuSeconds() float64 {
	var usage syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &usage); err != nil {
		return 0
	}
	return time.Duration(usage.Utime.Nano() + usage.Stime.Nano()).Seconds()
}
