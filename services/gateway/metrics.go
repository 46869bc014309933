package main

import (
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// stats are the gateway's Prometheus metrics, written in the text exposition format by hand
// (a handful of atomics: no client library needed).
type stats struct {
	byCode  [17]atomic.Uint64 // admitted calls forwarded, by the status they ended with
	refused atomic.Uint64     // admitted calls refused at the in-flight limit
	// Classify calls forwarded call by call because their connection had --max-token-streams
	// credentials' streams already, and calls refused for lacking a token (--require-token).
	overflowed, tokenless atomic.Uint64
	// Where a forwarded call's time goes: all of it (from the call's arrival to its answer),
	// the part spent waiting on the backend (from handing the request on, its wait for the
	// stream's sender included, to the backend's answer) and, per call, the rest: the
	// gateway's own (reading the request, writing the answer, waking the call's goroutine).
	callTime    *histogram
	backendTime *histogram
	ownTime     *histogram
}

func newStats() *stats {
	return &stats{callTime: newHistogram(), backendTime: newHistogram(), ownTime: newHistogram()}
}

// observe times one forwarded call; waited is its time on the backend, 0 if the backend
// never answered it (then only the whole is timed).
func (s *stats) observe(total, waited time.Duration) {
	s.callTime.observe(total)
	if waited > 0 {
		s.backendTime.observe(waited)
		s.ownTime.observe(total - waited)
	}
}

func (s *stats) count(err error) {
	code := status.Code(err)
	if int(code) < len(s.byCode) {
		s.byCode[code].Add(1)
	}
}

func (p *proxy) metricsHandler(w http.ResponseWriter, _ *http.Request) {
	var b strings.Builder
	b.WriteString("# HELP snaplearn_gateway_requests_total Inference calls forwarded, by the gRPC status they ended with.\n")
	b.WriteString("# TYPE snaplearn_gateway_requests_total counter\n")
	for code := range p.stats.byCode {
		if n := p.stats.byCode[code].Load(); n > 0 {
			fmt.Fprintf(&b, "snaplearn_gateway_requests_total{code=%q} %d\n", grpcCodeName(codes.Code(code)), n)
		}
	}
	b.WriteString("# HELP snaplearn_gateway_refused_total Inference calls refused (RESOURCE_EXHAUSTED) at the in-flight limit.\n")
	b.WriteString("# TYPE snaplearn_gateway_refused_total counter\n")
	fmt.Fprintf(&b, "snaplearn_gateway_refused_total %d\n", p.stats.refused.Load())
	b.WriteString("# HELP snaplearn_gateway_in_flight Inference calls being forwarded now.\n")
	b.WriteString("# TYPE snaplearn_gateway_in_flight gauge\n")
	fmt.Fprintf(&b, "snaplearn_gateway_in_flight %d\n", p.inFlight.Load())
	b.WriteString("# HELP snaplearn_gateway_max_in_flight Inference calls forwarded at once before refusing.\n")
	b.WriteString("# TYPE snaplearn_gateway_max_in_flight gauge\n")
	fmt.Fprintf(&b, "snaplearn_gateway_max_in_flight %d\n", p.maxInFlight)
	p.stats.callTime.write(&b, "snaplearn_gateway_request_seconds",
		"Admitted inference calls forwarded: seconds from the call's arrival to its answer.")
	p.stats.backendTime.write(&b, "snaplearn_gateway_backend_seconds",
		"Admitted inference calls forwarded: seconds from handing the request to a backend to its answer.")
	p.stats.ownTime.write(&b, "snaplearn_gateway_own_seconds",
		"Admitted inference calls the backend answered: seconds in the gateway itself (the call's time less the backend's).")
	b.WriteString("# HELP snaplearn_gateway_tokenless_refused_total Calls refused UNAUTHENTICATED for sending no token (--require-token).\n")
	b.WriteString("# TYPE snaplearn_gateway_tokenless_refused_total counter\n")
	fmt.Fprintf(&b, "snaplearn_gateway_tokenless_refused_total %d\n", p.stats.tokenless.Load())
	if p.conns[0].mux != nil {
		var opened, idleClosed uint64
		credentials := 0
		for _, c := range p.conns {
			opened += c.mux.opened.Load()
			idleClosed += c.mux.idleClosed.Load()
			credentials += c.mux.credentials()
		}
		b.WriteString("# HELP snaplearn_gateway_classify_streams_opened_total ClassifyStream calls opened to the backends (one per connection and caller token, more after breaks and rotations).\n")
		b.WriteString("# TYPE snaplearn_gateway_classify_streams_opened_total counter\n")
		fmt.Fprintf(&b, "snaplearn_gateway_classify_streams_opened_total %d\n", opened)
		b.WriteString("# HELP snaplearn_gateway_classify_streams_idle_closed_total Caller tokens' ClassifyStreams closed after --stream-idle unused.\n")
		b.WriteString("# TYPE snaplearn_gateway_classify_streams_idle_closed_total counter\n")
		fmt.Fprintf(&b, "snaplearn_gateway_classify_streams_idle_closed_total %d\n", idleClosed)
		b.WriteString("# HELP snaplearn_gateway_classify_stream_credentials Caller tokens with a ClassifyStream, summed over backend connections.\n")
		b.WriteString("# TYPE snaplearn_gateway_classify_stream_credentials gauge\n")
		fmt.Fprintf(&b, "snaplearn_gateway_classify_stream_credentials %d\n", credentials)
		b.WriteString("# HELP snaplearn_gateway_classify_overflowed_total Classify calls forwarded call by call: their connection had --max-token-streams tokens' streams.\n")
		b.WriteString("# TYPE snaplearn_gateway_classify_overflowed_total counter\n")
		fmt.Fprintf(&b, "snaplearn_gateway_classify_overflowed_total %d\n", p.stats.overflowed.Load())
	}
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	_, _ = w.Write([]byte(b.String()))
}

// grpcCodeName is the canonical upper-case name (OK, RESOURCE_EXHAUSTED, ...), as Python's
// grpc.StatusCode and our servers' metrics spell it.
func grpcCodeName(code codes.Code) string {
	names := map[codes.Code]string{
		codes.OK: "OK", codes.Canceled: "CANCELLED", codes.Unknown: "UNKNOWN",
		codes.InvalidArgument: "INVALID_ARGUMENT", codes.DeadlineExceeded: "DEADLINE_EXCEEDED",
		codes.NotFound: "NOT_FOUND", codes.AlreadyExists: "ALREADY_EXISTS",
		codes.PermissionDenied: "PERMISSION_DENIED", codes.ResourceExhausted: "RESOURCE_EXHAUSTED",
		codes.FailedPrecondition: "FAILED_PRECONDITION", codes.Aborted: "ABORTED",
		codes.OutOfRange: "OUT_OF_RANGE", codes.Unimplemented: "UNIMPLEMENTED",
		codes.Internal: "INTERNAL", codes.Unavailable: "UNAVAILABLE", codes.DataLoss: "DATA_LOSS",
		codes.Unauthenticated: "UNAUTHENTICATED",
	}
	if name, ok := names[code]; ok {
		return name
	}
	return fmt.Sprint(uint32(code))
}
