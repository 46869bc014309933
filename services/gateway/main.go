// Command snaplearn-gateway is an optional native front end for the vision server: a
// transparent gRPC proxy that refuses inference calls beyond an in-flight limit itself.
//
//	snaplearn-gateway --port 50050 --backend 127.0.0.1:50051 --max-in-flight 128
//
// Why: a Python grpc.aio server spends ~0.2 ms of its event loop on every call, refusals
// included, so under a few times its capacity the refusals themselves take the CPU and calls
// wait seconds in grpc's backlog (docs/DECISIONS.md, D17-D19). The gateway answers
// RESOURCE_EXHAUSTED in microseconds once --max-in-flight inference calls are being served,
// so the server only ever sees the load it can serve. Every other method (health,
// reflection, metadata, the Open Inference Protocol's control calls) is forwarded unchanged;
// payloads are never decoded or logged. Deadlines and cancellation travel with each call;
// the backend's status, message and metadata come back unchanged. Inference calls go to the
// backend connection carrying the fewest of them (--backend-connections per --backend); with
// --classify-stream, Classify calls go as items of one stream per backend process instead, to
// the process carrying the fewest (placement.go), one stream per caller token (streams.go),
// so that the server acts for each item's own caller.
//
// Prints "gateway ready on HOST:PORT (metrics :M)" and writes --ready-file once listening;
// SIGTERM/SIGINT stop it gracefully (in-flight calls finish within --shutdown-grace).
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// The inference methods put under the in-flight limit by default.
const defaultAdmitted = "/snaplearn.vision.v1.VisionService/Classify,/inference.GRPCInferenceService/ModelInfer"

type options struct {
	host               string
	port               int
	metricsPort        int
	backends           []string
	backendConnections int
	maxInFlight        int
	admitted           []string
	readyFile          string
	shutdownGrace      time.Duration
	maxMessageBytes    int
	classifyStream     bool
	groupByProcess     bool
	streamMaxAge       time.Duration
	streamIdle         time.Duration                    // a caller token's stream unused this long is closed
	maxTokenStreams    int                              // caller tokens with a stream per backend connection
	requireToken       bool                             // refuse calls without `authorization` (probes excepted) UNAUTHENTICATED
	gcPercent          int                              // 0: leave the Go runtime's own setting (GOGC, else 100)
	serverTLS          *tls.Config                      // nil: plaintext (tls.go)
	backendCreds       credentials.TransportCredentials // TLS to the backends, or insecure
}

func main() {
	o, err := parseArgs(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "snaplearn-gateway:", err)
		os.Exit(2)
	}
	if err := run(o); err != nil {
		log.Printf("snaplearn-gateway: %v", err)
		os.Exit(1)
	}
}

// env returns SNAPLEARN_GATEWAY_<name> or the default: every flag has an environment fallback.
func env(name, fallback string) string {
	if value, ok := os.LookupEnv("SNAPLEARN_GATEWAY_" + name); ok {
		return value
	}
	return fallback
}

func envInt(name string, fallback int) int {
	if value, err := strconv.Atoi(env(name, strconv.Itoa(fallback))); err == nil {
		return value
	}
	return fallback
}

func envBool(name string, fallback bool) bool {
	if value, err := strconv.ParseBool(env(name, strconv.FormatBool(fallback))); err == nil {
		return value
	}
	return fallback
}

func parseArgs(args []string, stderr io.Writer) (options, error) {
	var o options
	var backends, admitted string
	var grace, streamAge, streamIdle float64
	flags := flag.NewFlagSet("snaplearn-gateway", flag.ContinueOnError)
	flags.SetOutput(stderr)
	flags.StringVar(&o.host, "host", env("HOST", "127.0.0.1"), "interface to bind")
	flags.IntVar(&o.port, "port", envInt("PORT", 50050), "gRPC port (0 = pick)")
	flags.IntVar(&o.metricsPort, "metrics-port", envInt("METRICS_PORT", 9103), "Prometheus /metrics port (0 = pick)")
	flags.StringVar(&backends, "backend", env("BACKEND", ""), "vision server host:port, comma-separated for several (required)")
	flags.IntVar(&o.backendConnections, "backend-connections", envInt("BACKEND_CONNECTIONS", 4), "connections per backend")
	flags.IntVar(&o.maxInFlight, "max-in-flight", envInt("MAX_IN_FLIGHT", 128), "inference calls forwarded at once; beyond, RESOURCE_EXHAUSTED at once")
	flags.StringVar(&admitted, "admit", env("ADMIT", defaultAdmitted), "comma-separated full method names under the limit")
	flags.StringVar(&o.readyFile, "ready-file", env("READY_FILE", ""), "once listening, write {host, port, metrics_port, pid} as JSON here")
	flags.Float64Var(&grace, "shutdown-grace", 10, "seconds in-flight calls get to finish on SIGTERM")
	flags.IntVar(&o.maxMessageBytes, "max-message-bytes", envInt("MAX_MESSAGE_BYTES", 10*1024*1024+64*1024), "largest message either way")
	flags.BoolVar(&o.classifyStream, "classify-stream", envBool("CLASSIFY_STREAM", true),
		"carry Classify calls as items of one ClassifyStream per backend connection (false: forward each call)")
	flags.BoolVar(&o.groupByProcess, "group-by-process", envBool("GROUP_BY_PROCESS", true),
		"send the items for one backend process (named in its ClassifyStream headers) on one stream, "+
			"however many connections reach it (false: one stream per connection)")
	flags.Float64Var(&streamAge, "stream-max-age", 20, "seconds a ClassifyStream takes new items before a fresh one replaces it")
	flags.Float64Var(&streamIdle, "stream-idle", 10,
		"seconds a caller token's ClassifyStream may go unused before it is closed (each token has its own streams)")
	flags.IntVar(&o.maxTokenStreams, "max-token-streams", envInt("MAX_TOKEN_STREAMS", 1000),
		"caller tokens with a ClassifyStream per backend connection; callers beyond it are forwarded call by call")
	flags.BoolVar(&o.requireToken, "require-token", envBool("REQUIRE_TOKEN", false),
		"refuse calls that send no 'authorization' UNAUTHENTICATED in the gateway (health and OIP liveness/readiness "+
			"stay open); the servers check every token either way")
	// The gateway's heap is mostly request and answer bytes that live for one call, so Go's
	// default (collect after 100% growth) collects many times a second under load; 400 cost the
	// gateway less CPU per photo and left its own latency per call as it was (DECISIONS D24).
	flags.IntVar(&o.gcPercent, "gc-percent", envInt("GC_PERCENT", defaultGCPercent()),
		"Go's GC target, heap growth in percent between collections (0: Go's own, GOGC or 100; default 400 unless GOGC is set)")
	var t tlsOptions
	flags.StringVar(&t.cert, "tls-cert", env("TLS_CERT", ""), "TLS certificate chain (PEM), reloaded when it changes")
	flags.StringVar(&t.key, "tls-key", env("TLS_KEY", ""), "TLS private key (PEM)")
	flags.StringVar(&t.clientCA, "tls-client-ca", env("TLS_CLIENT_CA", ""), "mutual TLS: CA of client certificates")
	flags.StringVar(&t.backendCA, "backend-tls-ca", env("BACKEND_TLS_CA", ""), "TLS to the backends: their CA (PEM)")
	flags.StringVar(&t.backendCert, "backend-tls-cert", env("BACKEND_TLS_CERT", ""), "mutual TLS to the backends: certificate")
	flags.StringVar(&t.backendKey, "backend-tls-key", env("BACKEND_TLS_KEY", ""), "mutual TLS to the backends: key")
	flags.StringVar(&t.backendServerName, "backend-tls-server-name", env("BACKEND_TLS_SERVER_NAME", ""),
		"name the backends' certificate must carry (default: the backend's host)")
	if err := flags.Parse(args); err != nil {
		return o, err
	}
	var err error
	if o.serverTLS, o.backendCreds, err = loadTLS(t); err != nil {
		return o, err
	}
	for _, b := range strings.Split(backends, ",") {
		if b = strings.TrimSpace(b); b != "" {
			o.backends = append(o.backends, b)
		}
	}
	for _, m := range strings.Split(admitted, ",") {
		if m = strings.TrimSpace(m); m != "" {
			o.admitted = append(o.admitted, m)
		}
	}
	o.shutdownGrace = time.Duration(grace * float64(time.Second))
	o.streamMaxAge = time.Duration(streamAge * float64(time.Second))
	o.streamIdle = time.Duration(streamIdle * float64(time.Second))
	switch {
	case flags.NArg() > 0:
		return o, fmt.Errorf("unexpected arguments: %s", strings.Join(flags.Args(), " "))
	case len(o.backends) == 0:
		return o, errors.New("--backend is required")
	case o.port < 0 || o.port > 65535 || o.metricsPort < 0 || o.metricsPort > 65535:
		return o, errors.New("--port and --metrics-port must be in 0..65535")
	case o.backendConnections < 1:
		return o, errors.New("--backend-connections must be >= 1")
	case o.maxInFlight < 1:
		return o, errors.New("--max-in-flight must be >= 1")
	case !(grace >= 0):
		return o, errors.New("--shutdown-grace must be >= 0")
	case !(streamAge > 0):
		return o, errors.New("--stream-max-age must be > 0")
	case !(streamIdle > 0):
		return o, errors.New("--stream-idle must be > 0")
	case o.maxTokenStreams < 1:
		return o, errors.New("--max-token-streams must be >= 1")
	case o.gcPercent < 0:
		return o, errors.New("--gc-percent must be >= 0 (0: leave it to GOGC)")
	}
	for _, m := range o.admitted {
		if !strings.HasPrefix(m, "/") || strings.Count(m, "/") != 2 {
			return o, fmt.Errorf("--admit: %q is not a full method name like /pkg.Service/Method", m)
		}
	}
	return o, nil
}

func newProxy(o options) (*proxy, error) {
	p := &proxy{
		admitted: map[string]bool{}, maxInFlight: int64(o.maxInFlight), refusal: refusalFor(int64(o.maxInFlight)),
		stats: newStats(), multiplexed: o.classifyStream, groupByProcess: o.groupByProcess,
		requireToken: o.requireToken,
	}
	for _, m := range o.admitted {
		p.admitted[m] = true
	}
	for _, target := range o.backends {
		// Each ClientConn is its own TCP connection, so a backend of worker processes behind one
		// port (SO_REUSEPORT) is reached on several of them.
		for range o.backendConnections {
			conn, err := grpc.NewClient(target,
				grpc.WithTransportCredentials(o.backendCreds),
				grpc.WithDefaultCallOptions(
					grpc.MaxCallRecvMsgSize(o.maxMessageBytes), grpc.MaxCallSendMsgSize(o.maxMessageBytes)))
			if err != nil {
				p.close()
				return nil, fmt.Errorf("backend %s: %w", target, err)
			}
			conn.Connect()
			backend := &backendConn{conn: conn}
			if o.classifyStream {
				backend.mux = newMuxPool(conn, o.streamMaxAge, o.streamIdle, o.maxTokenStreams, p.regroup)
			}
			p.conns = append(p.conns, backend)
		}
	}
	p.regroup()
	return p, nil
}

func (p *proxy) close() {
	for _, c := range p.conns {
		if c.mux != nil {
			c.mux.close()
		}
		c.conn.Close()
	}
}

// newServer is the gateway's gRPC server: every method goes to the proxy, as bytes.
func newServer(p *proxy, o options) *grpc.Server {
	serverOptions := []grpc.ServerOption{
		grpc.UnknownServiceHandler(p.handle),
		grpc.InTapHandle(p.refuseEarly),
		grpc.ForceServerCodec(rawCodec{}),
		grpc.MaxRecvMsgSize(o.maxMessageBytes),
		grpc.MaxSendMsgSize(o.maxMessageBytes),
	}
	if o.serverTLS != nil {
		serverOptions = append(serverOptions, grpc.Creds(credentials.NewTLS(o.serverTLS)))
	}
	return grpc.NewServer(serverOptions...)
}

// defaultGCPercent is 400, a heap up to 5x its live size for less GC work per call (DECISIONS
// D24: less gateway CPU per photo, no change in the gateway's own latency), unless the operator
// set GOGC, which it then leaves alone.
func defaultGCPercent() int {
	if os.Getenv("GOGC") != "" {
		return 0
	}
	return 400
}

// applyGCTarget sets Go's GC target (--gc-percent) when percent > 0; 0 leaves Go's own.
func applyGCTarget(percent int) {
	if percent > 0 {
		debug.SetGCPercent(percent)
	}
}

func run(o options) error {
	applyGCTarget(o.gcPercent)
	p, err := newProxy(o)
	if err != nil {
		return err
	}
	defer p.close()
	listener, err := net.Listen("tcp", net.JoinHostPort(o.host, strconv.Itoa(o.port)))
	if err != nil {
		return err
	}
	metricsListener, err := net.Listen("tcp", net.JoinHostPort(o.host, strconv.Itoa(o.metricsPort)))
	if err != nil {
		listener.Close()
		return err
	}
	server := newServer(p, o)
	mux := http.NewServeMux()
	mux.HandleFunc("/metrics", p.metricsHandler)
	metrics := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = metrics.Serve(metricsListener) }()
	served := make(chan error, 1)
	go func() { served <- server.Serve(listener) }()

	port := listener.Addr().(*net.TCPAddr).Port
	metricsPort := metricsListener.Addr().(*net.TCPAddr).Port
	if o.readyFile != "" {
		if err := writeReadyFile(o.readyFile, o.host, port, metricsPort); err != nil {
			server.Stop()
			return err
		}
		defer os.Remove(o.readyFile)
	}
	fmt.Printf("gateway ready on %s (metrics :%d)\n", net.JoinHostPort(o.host, strconv.Itoa(port)), metricsPort)
	if o.serverTLS == nil {
		log.Printf("plaintext on its port: localhost development only (set --tls-cert and --tls-key)")
	}
	mode := "each Classify forwarded as a call"
	if o.classifyStream {
		mode = "Classify multiplexed onto one ClassifyStream per backend process and caller token"
	}
	log.Printf("forwarding to %s over %d connection(s) each (%s); at most %d inference calls in flight",
		strings.Join(o.backends, ", "), o.backendConnections, mode, o.maxInFlight)

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	select {
	case err := <-served:
		return err
	case sig := <-stop:
		log.Printf("%v: draining (up to %v)", sig, o.shutdownGrace)
	}
	drained := make(chan struct{})
	go func() { server.GracefulStop(); close(drained) }()
	select {
	case <-drained:
	case <-time.After(o.shutdownGrace):
		log.Printf("calls still in flight after %v: stopping", o.shutdownGrace)
		server.Stop()
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = metrics.Shutdown(ctx)
	return nil
}

// writeReadyFile writes atomically (write, then rename), so a reader never sees half a file.
func writeReadyFile(path, host string, port, metricsPort int) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	payload, _ := json.Marshal(map[string]any{"host": host, "port": port, "metrics_port": metricsPort, "pid": os.Getpid()})
	staging := filepath.Join(filepath.Dir(path), fmt.Sprintf(".%s.%d.tmp", filepath.Base(path), os.Getpid()))
	if err := os.WriteFile(staging, append(payload, '\n'), 0o644); err != nil {
		return err
	}
	return os.Rename(staging, path)
}
