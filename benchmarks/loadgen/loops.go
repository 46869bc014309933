package main

import (
	"math"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// closedLoop runs `concurrency` callers, each sending its next request when the previous one
// answers, until the window ends (measures capacity).
func closedLoop(c caller, images, concurrency int, warmup, window, timeout time.Duration) *loadResult {
	start := time.Now()
	rec := newRecorder(start.Add(warmup), start.Add(warmup+window))
	var wg sync.WaitGroup
	for index := range concurrency {
		wg.Go(func() {
			for n := index; time.Now().Before(rec.end); n += concurrency {
				began := time.Now()
				status, batchSize := c.call(index, n%images, timeout)
				rec.record(began, time.Now(), status, batchSize)
			}
		})
	}
	wg.Wait()
	return rec.result("closed", concurrency, 0)
}

// openLoop starts request n at start + n/rate whatever happens to earlier ones, each in its
// own goroutine (measures latency at a given load, and behaviour under overload). It sleeps
// until the next request is due and then starts every request that is due, so a late wake-up
// costs one batch of lag, not a growing backlog.
func openLoop(c caller, images int, rate float64, warmup, window, timeout time.Duration) *loadResult {
	due := func(n int) time.Duration { return time.Duration(float64(n) / rate * float64(time.Second)) }
	end := warmup + window
	first := int(math.Ceil(warmup.Seconds() * rate)) // the first request due inside the window
	for first > 0 && due(first-1) >= warmup {
		first--
	}
	for due(first) < warmup {
		first++
	}
	total := int(math.Ceil(end.Seconds() * rate)) // requests due before the window ends
	for total > 0 && due(total-1) >= end {
		total--
	}
	for due(total) < end {
		total++
	}
	// Send lag of the requests due inside the window, in ns, written by each request's goroutine.
	lags := make([]int64, max(0, total-first))
	for i := range lags {
		lags[i] = -1
	}

	start := time.Now()
	rec := newRecorder(start.Add(warmup), start.Add(end))
	var wg sync.WaitGroup
	one := func(n int, dueAt time.Duration) {
		defer wg.Done()
		began := time.Now()
		if n >= first {
			atomic.StoreInt64(&lags[n-first], int64(began.Sub(start)-dueAt))
		}
		status, batchSize := c.call(n, n%images, timeout)
		rec.record(began, time.Now(), status, batchSize)
	}
	for n := 0; n < total; {
		sleepUntil(start, due(n))
		now := time.Since(start)
		for ; n < total && due(n) <= now; n++ {
			wg.Add(1)
			go one(n, due(n))
		}
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(timeout + 5*time.Second):
	}

	result := rec.result("open", 0, rate)
	seen := make([]float64, 0, len(lags))
	for i := range lags {
		if lag := atomic.LoadInt64(&lags[i]); lag >= 0 {
			seen = append(seen, float64(lag)/1e6)
		}
	}
	slices.Sort(seen)
	result.sendLagP99Ms = percentile(seen, 0.99)
	return result
}

// recorder counts the requests started inside [start, end), as pyloadgen.py's Recorder.
type recorder struct {
	start, end time.Time

	mu         sync.Mutex
	sent       int
	okMs       []float64
	rejectedMs []float64
	statuses   map[string]int
	batchSum   int
	batchCount int
}

func newRecorder(start, end time.Time) *recorder {
	return &recorder{start: start, end: end, okMs: make([]float64, 0, 1<<16), statuses: map[string]int{}}
}

// record counts a request by its start time: under overload answers arrive late, and each must
// count for the window that sent it.
func (r *recorder) record(started, finished time.Time, status string, batchSize int) {
	if started.Before(r.start) || !started.Before(r.end) {
		return
	}
	ms := float64(finished.Sub(started)) / 1e6
	r.mu.Lock()
	defer r.mu.Unlock()
	r.sent++
	r.statuses[status]++
	switch status {
	case "OK":
		r.okMs = append(r.okMs, ms)
		if batchSize != 0 {
			r.batchSum += batchSize
			r.batchCount++
		}
	case "RESOURCE_EXHAUSTED", grpcCapStatus, "HTTP_429", "HTTP_503":
		r.rejectedMs = append(r.rejectedMs, ms)
	}
}

func (r *recorder) result(mode string, concurrency int, rate float64) *loadResult {
	r.mu.Lock()
	defer r.mu.Unlock()
	seconds := r.end.Sub(r.start).Seconds()
	ok := slices.Clone(r.okMs)
	rejected := slices.Clone(r.rejectedMs)
	slices.Sort(ok)
	slices.Sort(rejected)
	errors := map[string]int{}
	for status, n := range r.statuses {
		if status != "OK" {
			errors[status] = n
		}
	}
	result := &loadResult{
		mode: mode, concurrency: concurrency, rate: rate, seconds: seconds,
		sent: r.sent, ok: len(ok), throughput: float64(len(ok)) / seconds,
		p50Ms: percentile(ok, 0.50), p95Ms: percentile(ok, 0.95), p99Ms: percentile(ok, 0.99),
		errors: errors, rejectedP99Ms: percentile(rejected, 0.99),
		meanBatchSizeSeen: math.NaN(), sendLagP99Ms: math.NaN(), generatorCPUCores: math.NaN(),
	}
	if r.batchCount > 0 {
		result.meanBatchSizeSeen = float64(r.batchSum) / float64(r.batchCount)
	}
	return result
}

// percentile is pyloadgen.py's nearest rank: index round(fraction*(n-1)) (Python's round
// halves to even), NaN for no values.
func percentile(sorted []float64, fraction float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	index := int(math.RoundToEven(fraction * float64(len(sorted)-1)))
	return sorted[min(len(sorted)-1, max(0, index))]
}

// loadResult is pyloadgen.py's LoadResult; json() writes its fields in the same order.
type loadResult struct {
	mode              string
	concurrency       int
	rate              float64
	seconds           float64
	sent              int
	ok                int
	throughput        float64
	p50Ms             float64
	p95Ms             float64
	p99Ms             float64
	errors            map[string]int
	rejectedP99Ms     float64
	meanBatchSizeSeen float64
	sendLagP99Ms      float64
	generatorCPUCores float64
}

// json writes one line the way Python's json.dump would (NaN as the bare token NaN).
func (r *loadResult) json() []byte {
	var b strings.Builder
	field := func(name, value string) {
		if b.Len() == 0 {
			b.WriteString("{")
		} else {
			b.WriteString(", ")
		}
		b.WriteString(strconv.Quote(name) + ": " + value)
	}
	field("mode", strconv.Quote(r.mode))
	field("concurrency", strconv.Itoa(r.concurrency))
	field("rate", pyFloat(r.rate))
	field("seconds", pyFloat(r.seconds))
	field("sent", strconv.Itoa(r.sent))
	field("ok", strconv.Itoa(r.ok))
	field("throughput", pyFloat(r.throughput))
	field("p50_ms", pyFloat(r.p50Ms))
	field("p95_ms", pyFloat(r.p95Ms))
	field("p99_ms", pyFloat(r.p99Ms))
	statuses := make([]string, 0, len(r.errors))
	for status := range r.errors {
		statuses = append(statuses, status)
	}
	sort.Strings(statuses)
	errs := make([]string, len(statuses))
	for i, status := range statuses {
		errs[i] = strconv.Quote(status) + ": " + strconv.Itoa(r.errors[status])
	}
	field("errors", "{"+strings.Join(errs, ", ")+"}")
	field("rejected_p99_ms", pyFloat(r.rejectedP99Ms))
	field("mean_batch_size_seen", pyFloat(r.meanBatchSizeSeen))
	field("send_lag_p99_ms", pyFloat(r.sendLagP99Ms))
	field("generator_cpu_cores", pyFloat(r.generatorCPUCores))
	b.WriteString("}\n")
	return []byte(b.String())
}

// pyFloat formats like Python's float repr: shortest round trip, always with a '.' or an
// exponent, NaN/Infinity as json.dump writes them.
func pyFloat(f float64) string {
	switch {
	case math.IsNaN(f):
		return "NaN"
	case math.IsInf(f, 1):
		return "Infinity"
	case math.IsInf(f, -1):
		return "-Infinity"
	}
	if a := math.Abs(f); a != 0 && (a < 1e-4 || a >= 1e16) {
		s := strconv.FormatFloat(f, 'e', -1, 64) // 1e-05, 1e+16 as Python writes them
		return s
	}
	s := strconv.FormatFloat(f, 'f', -1, 64)
	if !strings.Contains(s, ".") {
		s += ".0"
	}
	return s
}

// sleepUntil sleeps until start+at. The Go runtime's timers wake up to 1 ms late (its poller
// waits whole milliseconds), so the last millisecond is a nanosleep(2) of this thread, late by
// the kernel's timer slack (50 µs) only.
func sleepUntil(start time.Time, at time.Duration) {
	wait := at - time.Since(start)
	if wait > 2*time.Millisecond {
		time.Sleep(wait - time.Millisecond)
		wait = at - time.Since(start)
	}
	if wait > 0 {
		ts := syscall.NsecToTimespec(int64(wait))
		syscall.Nanosleep(&ts, nil)
	}
}
