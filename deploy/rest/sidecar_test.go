package main

// Tests of the sidecar against a fake gateway (a real gRPC server in this process), for what the real mesh
// cannot easily show: Retry-After from trailers, every status mapping, mid-stream errors, metadata filtering.
// Run with `bash deploy/rest/build.sh --test` (tests/test_rest.py does).

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"io"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	"google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const testKey = "Bearer sk-test-secret"

type fakeGateway struct {
	UnimplementedInferenceServiceServer
	mu         sync.Mutex
	md         metadata.MD
	completion *CreateCompletionRequest
	chatStream *StreamChatCompletionRequest
}

// failure picks an error by model name, with a retry-after trailer for "rate-limited".
func failure(model string, setTrailer func(metadata.MD)) error {
	switch model {
	case "rate-limited":
		setTrailer(metadata.Pairs("retry-after", "7"))
		return status.Error(codes.ResourceExhausted, "rate limit exceeded: requests per minute of tenant t is 1")
	case "too-large":
		setTrailer(metadata.Pairs("x-should-retry", "false"))
		return status.Error(codes.ResourceExhausted, "this request needs 500 of the tokens per minute of tenant t (100)")
	case "forbidden":
		return status.Error(codes.PermissionDenied, "priority PRIORITY_INTERACTIVE is not allowed")
	case "disabled":
		return status.Error(codes.FailedPrecondition, "model version 'x' is disabled in the registry")
	case "slow":
		return status.Error(codes.DeadlineExceeded, "deadline exceeded")
	case "down":
		return status.Error(codes.Unavailable, "no worker serves the model")
	case "unknown":
		return status.Error(codes.NotFound, "model 'unknown' not found; ListModels (GET /v1/models) lists the available models")
	}
	return nil
}

func responseHeaders() metadata.MD {
	return metadata.Pairs("x-request-id", "req-123", "x-llmserve-cache", "miss",
		"x-llmserve-model-version", "smollm2-v1", "x-internal", "do-not-expose")
}

func (f *fakeGateway) CreateCompletion(ctx context.Context, req *CreateCompletionRequest) (*CreateCompletionResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	f.mu.Lock()
	f.md, f.completion = md, req
	f.mu.Unlock()
	if err := failure(req.Model, func(t metadata.MD) { grpc.SetTrailer(ctx, t) }); err != nil {
		return nil, err
	}
	grpc.SetHeader(ctx, responseHeaders())
	grpc.SetTrailer(ctx, metadata.Pairs("x-trailer", "t"))
	return &CreateCompletionResponse{Id: "cmpl-1", Object: "text_completion", Created: 1700000000, Model: "smollm2-v1",
		Choices: []*CompletionChoice{{Index: 0, Text: "a", FinishReason: "length"}, {Index: 1, Text: "b"}},
		Usage:   &Usage{PromptTokens: 2, CompletionTokens: 2, TotalTokens: 4}}, nil
}

func (f *fakeGateway) StreamChatCompletion(req *StreamChatCompletionRequest, stream InferenceService_StreamChatCompletionServer) error {
	md, _ := metadata.FromIncomingContext(stream.Context())
	f.mu.Lock()
	f.md, f.chatStream = md, req
	f.mu.Unlock()
	if err := failure(req.Model, stream.SetTrailer); err != nil {
		return err
	}
	stream.SetHeader(responseHeaders())
	chunk := func(role, content, reason string) *StreamChatCompletionResponse {
		return &StreamChatCompletionResponse{Id: "chatcmpl-1", Object: "chat.completion.chunk", Created: 1700000000,
			Model: "smollm2-v1", Choices: []*ChatChunkChoice{{Index: 0, FinishReason: reason,
				Delta: &ChatDelta{Role: role, Content: content}}}}
	}
	stream.Send(chunk("assistant", "Hel", ""))
	if req.Model == "midstream" {
		return status.Error(codes.Unavailable, "the worker went away; retry")
	}
	stream.Send(chunk("", "lo", ""))
	stream.Send(chunk("", "", "stop"))
	if req.StreamOptions == nil || req.StreamOptions.IncludeUsage {
		stream.Send(&StreamChatCompletionResponse{Id: "chatcmpl-1", Object: "chat.completion.chunk",
			Model: "smollm2-v1", Usage: &Usage{PromptTokens: 3, CompletionTokens: 2, TotalTokens: 5}})
	}
	return nil
}

func (f *fakeGateway) CreateEmbeddings(ctx context.Context, req *CreateEmbeddingsRequest) (*CreateEmbeddingsResponse, error) {
	return &CreateEmbeddingsResponse{Object: "list", Model: "minilm-v1",
		Data:  []*Embedding{{Index: 0, Object: "embedding", Embedding: []float32{0.5, -1.25, 3.1415927}}},
		Usage: &EmbeddingsUsage{PromptTokens: 1, TotalTokens: 1}}, nil
}

type harness struct {
	t       *testing.T
	url     string
	gateway *fakeGateway
	health  *health.Server
	log     *bytes.Buffer
}

func newHarness(t *testing.T) *harness {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer()
	fake := &fakeGateway{}
	RegisterInferenceServiceServer(server, fake)
	hs := health.NewServer()
	hs.SetServingStatus(inferenceService, grpc_health_v1.HealthCheckResponse_SERVING)
	grpc_health_v1.RegisterHealthServer(server, hs)
	go server.Serve(lis)
	ctx, cancel := context.WithCancel(context.Background())
	conn, handler, err := newSidecar(ctx, lis.Addr().String(), 4096)
	if err != nil {
		t.Fatal(err)
	}
	logs := &bytes.Buffer{}
	accessLog.SetOutput(logs)
	web := httptest.NewServer(handler)
	t.Cleanup(func() {
		web.Close()
		conn.Close()
		cancel()
		server.Stop()
	})
	return &harness{t: t, url: web.URL, gateway: fake, health: hs, log: logs}
}

func (h *harness) do(method, path, body string, headers ...string) (*http.Response, string) {
	h.t.Helper()
	req, _ := http.NewRequest(method, h.url+path, strings.NewReader(body))
	req.Header.Set("Authorization", testKey)
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		h.t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	return resp, string(raw)
}

type openAIError struct {
	Error struct {
		Message string  `json:"message"`
		Type    string  `json:"type"`
		Param   *string `json:"param"`
		Code    *string `json:"code"`
	} `json:"error"`
}

func parseError(t *testing.T, body string) openAIError {
	t.Helper()
	var e openAIError
	if err := json.Unmarshal([]byte(body), &e); err != nil || e.Error.Message == "" || e.Error.Type == "" {
		t.Fatalf("not an OpenAI error body: %q (%v)", body, err)
	}
	return e
}

func sseData(t *testing.T, body string) []string {
	t.Helper()
	var out []string
	sc := bufio.NewScanner(strings.NewReader(body))
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			continue
		}
		if !strings.HasPrefix(line, "data: ") {
			t.Fatalf("not an SSE data line: %q", line)
		}
		out = append(out, strings.TrimPrefix(line, "data: "))
	}
	return out
}

func TestUnaryMetadataAndJSON(t *testing.T) {
	h := newHarness(t)
	resp, body := h.do("POST", "/v1/completions",
		`{"model":"m","prompt":["x","y"],"stop":"\n","max_tokens":4.0,"user":null,"logprobs":null,"echo":false}`,
		"Grpc-Metadata-Evil", "1", "X-Other", "2")
	if resp.StatusCode != 200 {
		t.Fatalf("status %d: %s", resp.StatusCode, body)
	}
	md := h.gateway.md
	if got := md.Get("authorization"); len(got) != 1 || got[0] != testKey {
		t.Errorf("authorization metadata = %q, want exactly [%q]", got, testKey)
	}
	for k := range md {
		if strings.Contains(k, "evil") || strings.Contains(k, "other") || strings.HasPrefix(k, "grpcgateway-") {
			t.Errorf("request header leaked into metadata: %s", k)
		}
	}
	req := h.gateway.completion
	if len(req.Prompts) != 2 || req.Prompt != "" || len(req.Stop) != 1 || req.Stop[0] != "\n" ||
		req.MaxTokens.GetValue() != 4 {
		t.Errorf("request not normalised: %+v", req)
	}
	for _, k := range []string{"X-Request-Id", "X-Llmserve-Cache", "X-Llmserve-Model-Version"} {
		if resp.Header.Get(k) == "" {
			t.Errorf("missing header %s", k)
		}
	}
	for k := range resp.Header {
		if strings.HasPrefix(k, "Grpc-") || k == "Trailer" || k == "X-Internal" {
			t.Errorf("metadata noise in response headers: %s", k)
		}
	}
	var out map[string]interface{}
	json.Unmarshal([]byte(body), &out)
	choices := out["choices"].([]interface{})
	if choices[0].(map[string]interface{})["finish_reason"] != "length" ||
		choices[1].(map[string]interface{})["finish_reason"] != nil {
		t.Errorf("finish_reason: %s", body)
	}
	if _, ok := out["created"].(float64); !ok {
		t.Errorf("created is not a JSON number: %s", body)
	}
	if strings.Contains(h.log.String(), "sk-test-secret") || strings.Contains(h.log.String(), `"x"`) {
		t.Errorf("the access log holds a key or a body: %s", h.log.String())
	}
	if !strings.Contains(h.log.String(), "POST /v1/completions 200") {
		t.Errorf("no access-log line: %q", h.log.String())
	}
}

func TestStreamSSE(t *testing.T) {
	h := newHarness(t)
	resp, body := h.do("POST", "/v1/chat/completions",
		`{"model":"m","messages":[{"role":"developer","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],"stream":true}`)
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		t.Fatalf("status %d, content type %q: %s", resp.StatusCode, resp.Header.Get("Content-Type"), body)
	}
	req := h.gateway.chatStream
	if req.StreamOptions == nil || req.StreamOptions.IncludeUsage {
		t.Errorf("stream_options not injected as include_usage=false: %+v", req.StreamOptions)
	}
	if req.Messages[0].Role != "system" || req.Messages[0].Content != "a\nb" {
		t.Errorf("message not normalised: %+v", req.Messages[0])
	}
	data := sseData(t, body)
	if len(data) != 4 || data[3] != "[DONE]" {
		t.Fatalf("frames: %q", data)
	}
	var first, second, last map[string]interface{}
	json.Unmarshal([]byte(data[0]), &first)
	json.Unmarshal([]byte(data[1]), &second)
	json.Unmarshal([]byte(data[2]), &last)
	c0 := first["choices"].([]interface{})[0].(map[string]interface{})
	if c0["finish_reason"] != nil || c0["delta"].(map[string]interface{})["role"] != "assistant" {
		t.Errorf("first chunk: %s", data[0])
	}
	if _, hasRole := second["choices"].([]interface{})[0].(map[string]interface{})["delta"].(map[string]interface{})["role"]; hasRole {
		t.Errorf("empty role not removed: %s", data[1])
	}
	if last["choices"].([]interface{})[0].(map[string]interface{})["finish_reason"] != "stop" {
		t.Errorf("last chunk: %s", data[2])
	}
	for _, d := range data[:3] {
		if strings.Contains(d, `"usage"`) {
			t.Errorf("usage in a chunk without usage: %s", d)
		}
	}
}

func TestStreamIncludeUsage(t *testing.T) {
	h := newHarness(t)
	_, body := h.do("POST", "/v1/chat/completions:stream",
		`{"model":"m","messages":[{"role":"user","content":"a"}],"stream_options":{"include_usage":true}}`)
	if !h.gateway.chatStream.StreamOptions.GetIncludeUsage() {
		t.Errorf("include_usage not passed on")
	}
	data := sseData(t, body)
	if len(data) != 5 || data[4] != "[DONE]" || !strings.Contains(data[3], `"usage":{`) ||
		!strings.Contains(data[3], `"choices":[]`) {
		t.Fatalf("frames: %q", data)
	}
}

func TestErrorMapping(t *testing.T) {
	h := newHarness(t)
	cases := []struct {
		model  string
		status int
		code   string
	}{
		{"rate-limited", 429, "resource_exhausted"}, {"too-large", 429, "resource_exhausted"},
		{"forbidden", 403, "permission_denied"},
		{"disabled", 400, "failed_precondition"}, {"slow", 504, "deadline_exceeded"},
		{"down", 503, "unavailable"}, {"unknown", 404, "model_not_found"},
	}
	for _, c := range cases {
		for _, path := range []string{"/v1/completions", "/v1/chat/completions"} {
			body := `{"model":"` + c.model + `","prompt":"x"}`
			if strings.Contains(path, "chat") { // the stream path: errors before the first chunk keep their status
				body = `{"model":"` + c.model + `","messages":[{"role":"user","content":"x"}],"stream":true}`
			}
			resp, out := h.do("POST", path, body)
			if resp.StatusCode != c.status {
				t.Errorf("%s %s: status %d, want %d: %s", path, c.model, resp.StatusCode, c.status, out)
				continue
			}
			e := parseError(t, out)
			if e.Error.Code == nil || *e.Error.Code != c.code {
				t.Errorf("%s %s: code %v, want %s", path, c.model, e.Error.Code, c.code)
			}
			if got := resp.Header.Get("Retry-After"); (c.model == "rate-limited") != (got == "7") {
				t.Errorf("%s %s: Retry-After %q", path, c.model, got)
			}
			if got := resp.Header.Get("X-Should-Retry"); (c.model == "too-large") != (got == "false") {
				t.Errorf("%s %s: X-Should-Retry %q", path, c.model, got)
			}
		}
	}
}

func TestMidStreamError(t *testing.T) {
	h := newHarness(t)
	resp, body := h.do("POST", "/v1/chat/completions",
		`{"model":"midstream","messages":[{"role":"user","content":"x"}],"stream":true}`)
	data := sseData(t, body)
	if resp.StatusCode != 200 || len(data) != 2 {
		t.Fatalf("status %d, frames %q", resp.StatusCode, data)
	}
	e := parseError(t, data[1])
	if *e.Error.Code != "unavailable" || !strings.Contains(h.log.String(), "stream_error=UNAVAILABLE") {
		t.Errorf("error event %s, log %q", data[1], h.log.String())
	}
}

func TestBase64Embeddings(t *testing.T) {
	h := newHarness(t)
	_, body := h.do("POST", "/v1/embeddings", `{"model":"m","input":"x","encoding_format":"base64"}`)
	var out struct {
		Data []struct {
			Embedding string `json:"embedding"`
		} `json:"data"`
	}
	if err := json.Unmarshal([]byte(body), &out); err != nil || len(out.Data) != 1 {
		t.Fatalf("%v: %s", err, body)
	}
	raw, _ := base64.StdEncoding.DecodeString(out.Data[0].Embedding)
	want := []float32{0.5, -1.25, 3.1415927}
	if len(raw) != 12 {
		t.Fatalf("decoded %d bytes", len(raw))
	}
	for i, w := range want {
		if got := math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:])); got != w {
			t.Errorf("[%d] = %v, want %v", i, got, w)
		}
	}
	_, body = h.do("POST", "/v1/embeddings", `{"model":"m","input":["x"],"encoding_format":"float"}`)
	if !strings.Contains(body, `"embedding":[0.5,-1.25,3.1415927]`) {
		t.Errorf("float embeddings: %s", body)
	}
}

func TestHealth(t *testing.T) {
	h := newHarness(t)
	if resp, body := h.do("GET", "/health", ""); resp.StatusCode != 200 {
		t.Fatalf("serving: %d %s", resp.StatusCode, body)
	}
	h.health.SetServingStatus(inferenceService, grpc_health_v1.HealthCheckResponse_NOT_SERVING)
	if resp, body := h.do("GET", "/health", ""); resp.StatusCode != 503 {
		t.Fatalf("not serving: %d %s", resp.StatusCode, body)
	}
}

func TestBodyAndRouteErrors(t *testing.T) {
	h := newHarness(t)
	cases := []struct {
		method, path, body string
		status             int
		param              string
	}{
		{"POST", "/v1/completions", `{"model":`, 400, ""},
		{"POST", "/v1/completions", `{"model":"m"} x`, 400, ""},
		{"POST", "/v1/completions", `[]`, 400, ""},
		{"POST", "/v1/completions", `{"model":"m","prompt":"x","max_tokens":"abc"}`, 400, "max_tokens"},
		{"POST", "/v1/completions", `{"model":"m","prompt":"x","max_tokens":1.5}`, 400, "max_tokens"},
		{"POST", "/v1/completions", `{"model":"m","prompt":"x","max_tokens":9999999999}`, 400, "max_tokens"},
		{"POST", "/v1/completions", `{"model":"m","prompt":[1,2]}`, 400, "prompt"},
		{"POST", "/v1/completions", `{"model":"m","prompt":"x","stop":[1]}`, 400, "stop[0]"},
		{"POST", "/v1/chat/completions", `{"model":"m","messages":[{"role":"user","content":[{"type":"image_url"}]}]}`, 400, "messages[0].content"},
		{"POST", "/v1/chat/completions", `{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":"yes"}}`, 400, "stream_options.include_usage"},
		{"POST", "/v1/embeddings", `{"model":"m","input":"x","encoding_format":"int8"}`, 400, "encoding_format"},
		{"POST", "/v1/completions", `{"model":"m","prompt":"` + strings.Repeat("a", 5000) + `"}`, 413, ""},
		{"POST", "/v1/nope", `{}`, 404, ""},
		{"GET", "/v1/chat/completions", ``, 405, ""},
		{"POST", "/v1/models", `{}`, 405, ""},
		{"GET", "/", ``, 404, ""},
		{"POST", "/v1/embeddings:stream", `{}`, 404, ""},
	}
	for _, c := range cases {
		resp, body := h.do(c.method, c.path, c.body)
		if resp.StatusCode != c.status {
			t.Errorf("%s %s %.60s: status %d, want %d: %s", c.method, c.path, c.body, resp.StatusCode, c.status, body)
			continue
		}
		e := parseError(t, body)
		if c.param != "" && (e.Error.Param == nil || *e.Error.Param != c.param) {
			t.Errorf("%s %.60s: param %v, want %s (%s)", c.path, c.body, e.Error.Param, c.param, body)
		}
	}
}

// The int64 seed is sent as a JSON number and reaches the gateway intact.
func TestSeedAndWrappers(t *testing.T) {
	h := newHarness(t)
	h.do("POST", "/v1/completions", `{"model":"m","prompt":"x","seed":9007199254740993,"temperature":0,"n":2}`)
	req := h.gateway.completion
	if req.Seed.GetValue() != 9007199254740993 || req.Temperature == nil || req.N.GetValue() != 2 {
		t.Errorf("wrappers: %+v", req)
	}
}
