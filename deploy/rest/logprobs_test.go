package main

import (
	"bytes"
	"encoding/json"
	"testing"
)

func decodeJSON(t *testing.T, s string) map[string]interface{} {
	dec := json.NewDecoder(bytes.NewReader([]byte(s)))
	dec.UseNumber()
	var v map[string]interface{}
	if err := dec.Decode(&v); err != nil {
		t.Fatal(err)
	}
	return v
}

func TestCompletionLogprobsTakeOpenAIsLegacyShape(t *testing.T) {
	choice := decodeJSON(t, `{"logprobs": {"content": [
		{"token": "The", "logprob": null, "bytes": [84, 104, 101], "top_logprobs": [], "token_id": 1, "text_offset": 0},
		{"token": " sky", "logprob": -1.5, "bytes": [], "token_id": 2, "text_offset": 3,
		 "top_logprobs": [{"token": " sea", "logprob": -0.5, "bytes": [], "token_id": 3}]}]}}`)
	reshapeLogprobs(choice, true)
	got, _ := json.Marshal(choice["logprobs"])
	want := `{"text_offset":[0,3],"token_logprobs":[null,-1.5],"tokens":["The"," sky"],` +
		`"top_logprobs":[null,{" sea":-0.5," sky":-1.5}]}`
	if string(got) != want {
		t.Fatalf("got %s, want %s", got, want)
	}
	chat := decodeJSON(t, `{"logprobs": {"content": [{"token": "a", "logprob": -1}]}}`)
	reshapeLogprobs(chat, false)
	if _, ok := chat["logprobs"].(map[string]interface{})["content"]; !ok {
		t.Fatalf("chat logprobs changed: %v", chat)
	}
	none := map[string]interface{}{"logprobs": nil}
	reshapeLogprobs(none, true)
	if none["logprobs"] != nil {
		t.Fatalf("absent logprobs must stay null: %v", none)
	}
}

func TestTokenIDPromptsMoveToPromptTokenIDs(t *testing.T) {
	for _, tc := range []struct{ in, want, rename string }{
		{`{"prompt": [1, 2]}`, `[{"token_ids":[1,2]}]`, "prompt_token_ids[0]"},
		{`{"prompt": [[1], [2, 3]]}`, `[{"token_ids":[1]},{"token_ids":[2,3]}]`, "prompt_token_ids"},
	} {
		state := &requestState{renames: map[string]string{}}
		body := decodeJSON(t, tc.in)
		if err := moveTokenPrompts(body, state); err != nil {
			t.Fatal(err.message)
		}
		got, _ := json.Marshal(body["prompt_token_ids"])
		if string(got) != tc.want || state.renames[tc.rename] != "prompt" || body["prompt"] != nil {
			t.Fatalf("%s: got %s, renames %v", tc.in, got, state.renames)
		}
	}
	state := &requestState{renames: map[string]string{}}
	if err := moveTokenPrompts(decodeJSON(t, `{"prompt": [[1], 2]}`), state); err == nil || err.param != "prompt[1]" {
		t.Fatalf("a mixed batch must be refused naming prompt[1]: %v", err)
	}
	direct := decodeJSON(t, `{"prompt_token_ids": [{"token_ids": [0.0, 7]}]}`)
	if err := moveTokenPrompts(direct, state); err != nil {
		t.Fatal(err.message)
	}
	if got, _ := json.Marshal(direct); string(got) != `{"prompt_token_ids":[{"token_ids":[0,7]}]}` {
		t.Fatalf("integral numbers are sent as integers: %s", got)
	}
	bad := decodeJSON(t, `{"prompt_token_ids": [{"token_ids": [1.5]}]}`)
	if err := moveTokenPrompts(bad, state); err == nil || err.param != "prompt_token_ids[0].token_ids[0]" {
		t.Fatalf("a fraction must be refused naming it: %v", err)
	}
}
